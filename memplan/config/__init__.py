"""Input: the YAML spec a user writes (`spec`: the whole `Spec`, with its model, precision,
optimizer and training sections; `parallelism`, `machine` (hardware), `plan` and `finetune` for
the larger sections; `base`: what they share) and how it is read from disk with each field's line
kept for error messages (`load`). The catalogues the spec is validated against (GPUs, precision
recipes, optimizers) sit one level up, in memplan/, because every later stage reads them too."""
