"""`memplan verify`: prove each prediction on real tensors.

Builds the real model (transformers, random init) and the real torch optimizer, runs real
training steps on one process, on torch.distributed ranks (FSDP2, DDP,
ZeroRedundancyOptimizer) or under FakeTensorMode, and compares what each category holds
with the calculator's prediction, rank by rank.

The only package of memplan that imports torch and transformers. `job`, `result`, `runner`
and `render` import neither (the CLI loads them first); `build`, `measure`, `rank` and
`launch` do, and are imported only when a run starts. `trace` reads facts from the model code
by running it (inventories on the meta device, saved tensors under FakeTensorMode); importing it
imports neither library either.
"""
