"""Model states: parameters, gradients and optimizer states per rank. `terms` is
the vocabulary (Term, RankStates, optimizer terms by dtype), `parallel` splits the model by
tensor, pipeline and expert parallelism, `engines` shard what each rank keeps (DDP, FSDP2,
DeepSpeed, Megatron, offload), `fp8` adds Transformer Engine's scaling state and `stages`
assembles one pipeline stage's ranks."""
