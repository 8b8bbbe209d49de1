"""The library versions memplan's rules were read from, in one place.

The activation rules (memplan/activations/) transcribe transformers' modeling code and torch's
autograd/SDPA kernels; the engine rules (memplan/states/engines/) transcribe DeepSpeed,
Megatron-core
and torch.distributed. Where a rule differs between two supported transformers releases the
calculator takes the version as a value (`Setting.transformers`); where that value comes from
(a spec key, the installed package) is decided at the edge (memplan/config/load.py). Pure: no I/O.
"""

from __future__ import annotations

RULES_TORCH = "2.13"
"""torch the activation, SDPA-kernel and FSDP2 rules describe (constraints.txt pins 2.13.0)."""

RULES_TRANSFORMERS = "5.25"
"""transformers the activation rules describe (constraints.txt pins 5.25.0)."""

OLDEST_TRANSFORMERS = "5.24"
"""The oldest transformers whose rules memplan keeps (Falcon's 5.24 attention: falcon.py)."""

ENGINES: dict[str, str] = {
    # memplan/states/engines/deepspeed.py and offload.py: "Read from deepspeedai/DeepSpeed 0.19.6";
    # the optimizer selection, BF16_Optimizer and the zero_optimization defaults were read
    # (and run, tests/data/deepspeed_*.json) at 0.19.8, each cited with its release there.
    "deepspeed": "0.19.6",
    # memplan/states/engines/megatron.py and offload.py: NVIDIA/Megatron-LM branch core_r0.12.
    "megatron-core": "0.12",
    # memplan/states/engines/fsdp2.py and ddp.py cite torch/distributed/fsdp/_fully_shard/ and
    # torch/nn/parallel/distributed.py at the torch the activation rules describe.
    "torch": RULES_TORCH,
}
"""The engine libraries (and versions) the engine rules (memplan/states/engines/) were read from."""


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "5.24", "5.25.0", "2.13.0+cpu", "5.26.0.dev0".

    Raises ValueError when it does not start with two dot-separated integers."""
    parts = version.strip().split(".")
    if len(parts) < 2:
        raise ValueError(f"{version!r} is not a version (expected MAJOR.MINOR, e.g. 5.25)")
    minor = parts[1]
    digits = ""
    for ch in minor:
        if not ch.isdigit():
            break
        digits += ch
    if not parts[0].isdigit() or not digits:
        raise ValueError(f"{version!r} is not a version (expected MAJOR.MINOR, e.g. 5.25)")
    return int(parts[0]), int(digits)


def major_minor(version: str) -> str:
    """ "5.25.0" -> "5.25"."""
    major, minor = parse(version)
    return f"{major}.{minor}"


def at_most(version: str, bound: str) -> bool:
    """True when `version`'s major.minor is `bound`'s or older."""
    return parse(version) <= parse(bound)


def same_minor(a: str, b: str) -> bool:
    """True when the two versions share major.minor."""
    return parse(a) == parse(b)


def rules_release(transformers: str | None) -> str:
    """The transformers release whose rules describe `transformers` (major.minor or None):
    OLDEST_TRANSFORMERS for it and older, RULES_TRANSFORMERS otherwise (None included)."""
    if transformers is not None and at_most(transformers, OLDEST_TRANSFORMERS):
        return OLDEST_TRANSFORMERS
    return RULES_TRANSFORMERS


def rules_note(transformers: str) -> str:
    """One line for the tables: which versions the activation and engine rules describe."""
    engines = ", ".join(f"{name} {version}" for name, version in ENGINES.items())
    activations = f"torch {RULES_TORCH}, transformers {transformers}"
    return f"rules: {activations} (activations); {engines} (engines)"


def mismatches(
    *, torch: str | None, transformers: str | None, rules_transformers: str
) -> list[str]:
    """`memplan verify`'s warnings: one sentence per installed library whose major.minor is
    not the one the rules used describe (None: not installed, nothing to compare)."""
    out = []
    for name, installed, rules in (
        ("torch", torch, RULES_TORCH),
        ("transformers", transformers, rules_transformers),
    ):
        if installed is None:
            continue
        try:
            same = same_minor(installed, rules)
        except ValueError:
            same = False
        if not same:
            out.append(
                f"installed {name} {installed} differs from {name} {rules}, the version "
                "memplan's rules describe: measured bytes may differ from the prediction for "
                "that reason (`pip install -c constraints.txt` installs the described versions)."
            )
    return out
