# make test: install the test extras (torch CPU build first) and run lint, types and tests.
PY ?= python

.PHONY: test dev lint types pytest test-slow test-all test-min gpu gpu-check bench

test: dev lint types pytest

# Every install takes constraints.txt: the versions the rules describe and the tests ran with.
# torch first, the CPU build: on these machines `torch==2.13.0` resolves to the local CPU wheel;
# on an ordinary machine add `--index-url https://download.pytorch.org/whl/cpu` to that line.
dev:
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt --no-deps $(STACKS)

# The stacks whose own code the tests run (torchtitan's model, FSDP wrapping and SAC, torchao's
# Float8Linear; triton because torchtitan's MoE kernels import it; litgpt's GPT, which imports
# lightning and torchmetrics; Megatron-Core's GPTModel), without their dependencies: their
# wheels ask for datasets, wandb and a CUDA build of torch; the modules the tests import need
# only these (constraints.txt pins them).
STACKS = torchtitan torchao triton spmd_types tyro einops docstring_parser torch_checkpointing \
	litgpt lightning lightning-utilities torchmetrics megatron-core

lint:
	$(PY) -m ruff check memplan tests benchmarks scripts
	$(PY) -m ruff format --check memplan tests benchmarks scripts

types:
	$(PY) -m mypy

# The default run leaves out the tests marked slow (real engines on gloo ranks, fake-tensor
# runs at full scale, real torchrun launches: 211 tests, about 10 minutes on 2 cores), so that
# `make test` and .ci/run stay well under 15 minutes; `make test-slow` runs them, `make
# test-all` runs everything after lint and types.
pytest:
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

test-slow: dev
	$(PY) -m pytest -q -p no:cacheprovider -m slow

test-all: dev lint types
	$(PY) -m pytest -q -p no:cacheprovider

# The calculator alone, without torch: what `memplan estimate` needs. Runs the tests whose
# modules import neither torch nor transformers (tests/conftest.py marks the others `torch`),
# in an environment with or without torch.
test-min:
	$(PY) -m pytest -q -p no:cacheprovider -m "not torch and not gpu"

# CUDA tests (skipped without a GPU).
gpu:
	$(PY) -m pytest -q -m gpu

# memplan verify on CUDA over a small grid: predicted vs measured allocated / reserved /
# NVML-used bytes (benchmarks/results/gpu-<gpu>.json); `make gpu-check ARGS=--dry-run` on CPU.
gpu-check:
	$(PY) benchmarks/gpu_check.py $(ARGS)

bench:
	$(PY) benchmarks/estimate_speed.py
