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

import gc
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from typing import Any

from memplan.errors import MemplanError
from memplan.model.families import supported_model_types
from memplan.model.inventory import Inventory

Slices = tuple[tuple[int, int], ...]
"""(TP degree, vocabulary rows) of TP rank slices (memplan.activations.layout.profile_slices)."""

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


def traced_profiles(
    loaded: Any,
    inventory: Inventory,
    *,
    checkpointing: tuple[str, ...] = (),
    tensor_slices: Slices | Callable[[], Slices] | None = None,
) -> tuple[Inventory, list[str]]:
    """`inventory` with a profile traced and cached for each activation setting of transformers'
    model code that no hand rule (or one that does not cover the setting: memplan.activations.
    rule_refuses) and no stored profile serves (the spec's own, and the spec with each
    `checkpointing` value plan searches), of the whole model and of each TP rank's slice in
    `tensor_slices` ((TP degree, vocabulary rows): memplan.plan.search.tensor_slices, called
    only for a model that has no rule; None: the spec's own layout's,
    memplan.activations.layout.profile_slices), when torch and transformers are installed; and
    one line per trace for the user. Without them, or when the model has no config to trace,
    `inventory` unchanged (the report then says activations are not modelled and how to get a
    profile). A model the tracer refuses (its MemplanError: a MoE recipe fake tensors cannot
    run, ...) is reported in the lines, not raised: the estimate goes on without activations, as
    it does without torch."""
    from dataclasses import replace

    from memplan.model import profile as profile_doc
    from memplan.model.families import family_of
    from memplan.report.settings import setting_of

    arch = inventory.architecture
    if arch is None or missing_libraries():
        return inventory, []
    if loaded.spec.model.implementation != "transformers":
        # Another stack's model code has its own rule and never reads a profile traced from
        # transformers (memplan.activations.predict): tracing one would only cost time.
        return inventory, []
    family = family_of(arch.model_type)
    specs = [loaded.spec]
    for value in checkpointing:
        if value != loaded.spec.training.activation_checkpointing:
            training = loaded.spec.training.model_copy(update={"activation_checkpointing": value})
            specs.append(loaded.spec.model_copy(update={"training": training}))
    ruled = family is not None and family.modelled
    if ruled:
        # A hand rule serves: traced only where it does not cover the setting, the whole
        # model's (the rule's tensor-parallel slices never read a profile).
        from memplan.activations import rule_refuses

        specs = [s for s in specs if rule_refuses(arch, setting_of(s))]
        if not specs:
            return inventory, []
        tensor_slices = ()
    if tensor_slices is None:
        from memplan.activations.layout import profile_slices
        from memplan.report.settings import layout_of

        tensor_slices = profile_slices(arch, layout_of(loaded.spec))
    elif callable(tensor_slices):
        tensor_slices = tensor_slices()
    lines: list[str] = []
    profiles = inventory.profiles
    stored_beside = False
    installed = installed_versions()
    for spec, (tp, rows) in ((s, t) for s in specs for t in ((1, 0), *tensor_slices)):
        st = setting_of(spec)
        found = profile_doc.matching(profiles, st, tensor=tp, vocab_rows=rows)
        # the regime st.sequence runs in (below or past a sliding window): traced when missing
        served = found.at_sequence(st.sequence) if found is not None else None
        what = f"{st.checkpointing} recomputation" + (
            f", one rank of tensor {tp} with {rows:,} vocabulary rows" if tp > 1 else ""
        )
        stale = served is not None and any(
            served.versions.get(name) != version for name, version in installed.items()
        )
        if served is not None and not stale:
            continue
        from memplan.verify.trace import profile as tracer  # torch: only when tracing

        gc.enable()  # torch's tracing: the collector back on (memplan.cli.app.main turns it off)
        started = _now()
        try:
            doc, path = tracer.for_spec(replace(loaded, spec=spec), tensor=tp, vocab_rows=rows)
        except MemplanError as err:
            kept = " (the stored profile, traced with other versions, serves)" if stale else ""
            lines.append(f"activations of {arch.model_type!r} ({what}) not traced: {err}{kept}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tracer.dumps(doc), encoding="utf-8")
        if family is None and not stored_beside:
            # Its inventory beside it, so the next estimate needs no torch (memplan.model.stored).
            from memplan.model import load as model_load
            from memplan.verify.trace import stored

            config = model_load.model_config(loaded)
            if config is not None:
                stored.write(config, model_load.cache_dir())
                stored_beside = True
        profiles = (
            *(p for p in profiles if p is not found),
            profile_doc.from_document(doc, origin=str(path)),
        )
        why = (
            "the stored profile was traced with "
            + ", ".join(f"{k} {v}" for k, v in sorted(served.versions.items()))
            if stale and served is not None
            else f"the stored profile holds no regime for sequence {st.sequence}"
            if found is not None and served is None
            else "no stored profile"
        )
        lines.append(
            f"traced the activations of {arch.model_type!r} ({what}; "
            f"{'the hand rule does not cover it' if ruled else 'no hand rule'}, {why}) in "
            f"{_now() - started:.1f} s; cached at {path}."
        )
    return replace(inventory, profiles=profiles), lines


def installed_versions() -> dict[str, str]:
    """torch's and transformers' installed versions, read from their metadata (no import): a
    stored profile traced with others is traced again (the issue keys profiles by library
    versions; the cache keeps the newest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _now() -> float:
    import time

    return time.perf_counter()
