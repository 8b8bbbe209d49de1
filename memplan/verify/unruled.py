"""verify for a model_type with no hand-written family: its inventory and its predicted
activations, both read from the model code.

- Inventory: the model transformers builds on the meta device (memplan.verify.trace.meta, as
  `memplan estimate` gets it through `load_inventory(..., unsupported=fallback_inventory)`).
- Activations: a traced profile (memplan.model.profile) that serves the spec's setting: the
  stored one (memplan.model.load.find_profiles: $MEMPLAN_CACHE/profiles, then the profiles
  shipped with memplan), else one traced now with memplan.verify.trace.profile.build (verify has
  torch; it is not stored: `memplan profile SPEC` stores it). Where the trace refuses the model
  (or fails in the model code) the activations are not modelled, and verify shows the measured
  bytes unchecked, as for a family without an activation rule; `Served.detail` says why.

The real model verify runs is the class the trace built (the `architectures` language-model
head, else AutoModelForCausalLM: memplan.verify.build.build_model with `unruled=True`), so the
measurement and the prediction describe the same model; the measurement itself (saved-tensor
hooks on real tensors, memplan.verify.measure) shares no code with the trace's fit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.families import family_of
from memplan.model.load import find_profiles
from memplan.model.profile import Profile, from_document, serving
from memplan.model.sources import Inventory
from memplan.report.settings import setting_of

Source = Literal["rule", "profile", "none"]


@dataclass(frozen=True, slots=True)
class Served:
    """Where the prediction's activations come from (verify's setup and notes)."""

    source: Source
    """rule (a hand family), profile (stored or traced now) or none."""
    profile: str | None = None
    """The profile's file stem, when one serves."""
    origin: str | None = None
    """stored: the profile file's path; traced: "traced now"; None for a rule."""
    detail: str = ""
    """One sentence for verify's notes (empty for a rule)."""


RULE = Served("rule")


def is_unruled(config: Mapping[str, Any]) -> bool:
    """True when no hand-written family serves the config's model_type."""
    model_type = config.get("model_type")
    return isinstance(model_type, str) and family_of(model_type) is None


def lacks_rule(config: Mapping[str, Any]) -> bool:
    """True when a hand-written family serves the config's model_type with its inventory but
    has no activation rule (Family.modelled: Phi, RoBERTa, T5, ...): as `memplan estimate`
    does (memplan.verify.trace.traced_profiles), verify predicts its activations from a
    profile."""
    model_type = config.get("model_type")
    family = family_of(model_type) if isinstance(model_type, str) else None
    return family is not None and not family.modelled


def inventory(config: Mapping[str, Any], spec: Spec, *, origin: str) -> tuple[Inventory, Served]:
    """The inventory of an unruled config (meta build) with the profile serving `spec`."""
    from memplan.verify.trace.meta import inventory_from_config

    return with_profile(inventory_from_config(config, origin=origin), config, spec)


def with_profile(inv: Inventory, config: Mapping[str, Any], spec: Spec) -> tuple[Inventory, Served]:
    """`inv` with the profile of `config` serving `spec`: a stored one, else one traced now."""
    st = setting_of(spec)
    stored = serving(find_profiles(dict(config)), st)
    if stored is not None:
        served = Served(
            "profile",
            profile=stored.key.file_stem(),
            origin="stored",
            detail=f"activations predicted from the stored profile {stored.key.file_stem()}.",
        )
        return replace(inv, profiles=(stored,)), served
    try:
        traced, seconds = trace(config, spec)
    except MemplanError as err:
        return inv, Served(
            "none",
            detail=(
                f"no profile serves this setting and tracing one failed: {err.message} "
                "Measured activations are shown, not checked."
            ),
        )
    served = Served(
        "profile",
        profile=traced.key.file_stem(),
        origin="traced now",
        detail=(
            f"activations predicted from a profile traced now ({traced.key.file_stem()}, "
            f"{seconds:.1f} s under FakeTensorMode; not stored: `memplan profile SPEC` "
            "stores it)."
        ),
    )
    return replace(inv, profiles=(traced,)), served


def trace(config: Mapping[str, Any], spec: Spec) -> tuple[Profile, float]:
    """A profile of `config` for the spec's setting, traced now (memplan.verify.trace.profile)."""
    from memplan.verify.trace import profile as tracer

    started = time.perf_counter()
    doc = tracer.for_setting(config, spec)
    return from_document(doc, origin="trace"), time.perf_counter() - started
