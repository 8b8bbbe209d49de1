"""Facts derived by running the model code: the torch edge beside cli and verify.

`meta` builds a model transformers knows on the meta device (no memory, any size) and reads
its inventory; `profile` traces one forward + loss of a reduced model under torch's
FakeTensorMode and writes what autograd saves as a profile document, which the pure calculator
reads through memplan.model.profile (`cuda` makes those fake CPU tensors save what the CUDA
kernels save, for device=cuda profiles). torch and transformers are imported only inside the
functions that need them, so importing this package costs nothing; the CLI reaches it only when
a model_type has no hand-written family (memplan.model.families) or `memplan profile` runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.util import find_spec
from typing import Any

from memplan.errors import MemplanError
from memplan.model.families import supported_model_types
from memplan.model.inventory import Inventory

TORCH_CPU_WHEELS = "https://download.pytorch.org/whl/cpu"


def missing_libraries() -> list[str]:
    """torch and transformers, those not installed (looked up, not imported)."""
    return [name for name in ("torch", "transformers") if find_spec(name) is None]


def fallback_inventory(config: Mapping[str, Any], origin: str) -> Inventory:
    """The inventory of a config whose model_type no hand-written family serves: built by
    transformers on the meta device (memplan.verify.trace.meta) when torch and transformers are
    installed, else one error that says how to get them."""
    missing = missing_libraries()
    if missing:
        model_type = config.get("model_type")
        raise MemplanError(
            f"model_type {model_type!r} has no hand-written memplan family (those: "
            f"{', '.join(supported_model_types())}). memplan can build any model transformers "
            f"knows on the meta device (no weights, no download), but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: `pip install torch "
            f"transformers` (a CPU-only torch is enough: `pip install torch --index-url "
            f"{TORCH_CPU_WHEELS}`). Otherwise give `model: {{num_parameters: N}}` for model "
            "states only.",
            field="model_type",
        )
    from memplan.verify.trace.meta import inventory_from_config

    return inventory_from_config(config, origin=origin)
