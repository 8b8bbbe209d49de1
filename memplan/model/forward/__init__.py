"""The vocabulary of a forward pass: the tensors autograd saves (`tensors`: Saved, Block,
Activations, Setting), what each kernel saves and allocates (`kernels`, `attention`), and how a
family's blocks assemble into one forward and its loss (`assemble`). The families describe their
forward in these terms; memplan.activations lays it out on a rank."""
