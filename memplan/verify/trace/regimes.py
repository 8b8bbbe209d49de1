"""A profile document's sequence regimes kept together: a windowed or chunked model is traced
one regime at a time (memplan.verify.trace.profile.build, as the sequence asked needs), and the
document stored keeps the others beside the one traced last (memplan.model.profile.Regime)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REGIME_KEYS = ("fit", "blocks", "build_seconds")
"""What one sequence regime of a profile document holds (beside the document's own)."""


def merge(stored: Mapping[str, Any] | None, doc: Mapping[str, Any]) -> dict[str, Any]:
    """`doc` (one regime just traced) with the other regimes of `stored`, a document of the same
    key traced with the same library versions, kept beside it under `regimes`
    (memplan.model.profile.Regime); `doc` alone when `stored` is another key or versions."""
    out = dict(doc)
    if (
        stored is None
        or stored.get("key") != doc.get("key")
        or stored.get("versions") != doc.get("versions")
        or stored.get("schema") != doc.get("schema")
    ):
        return out
    bound = int(doc["fit"].get("max_sequence", 0))
    kept = [
        r
        for r in (
            {k: stored[k] for k in REGIME_KEYS if k in stored},
            *stored.get("regimes", ()),
        )
        if int(r["fit"].get("max_sequence", 0)) != bound
    ]
    if kept:
        out["regimes"] = kept
    return out
