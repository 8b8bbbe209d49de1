"""Reading the model code by running it: torch and transformers at the edge, beside cli and verify.

`profile` traces one forward + loss of a reduced model under torch's FakeTensorMode (no memory,
any size) and writes what autograd saves as a profile document, which the pure calculator reads
through memplan.model.profile.
"""
