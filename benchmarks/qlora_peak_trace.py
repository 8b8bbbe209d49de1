"""What is alive at a QLoRA step's measured peak: `memplan verify` with its MemTracker watched.

    PYTHONPATH=. python benchmarks/qlora_peak_trace.py SPEC.yaml   # one verify run; prints

Runs `memplan verify SPEC` in this process (a one-rank spec: DDP data 1) with torch's
MemTracker (torch/distributed/_tools/mem_tracker.py, what verify measures the CPU peak with)
patched to remember, for each storage it tracks, the op that made it, and, at each new peak,
the op running, the modules active, the totals by reference type and every live activation
and temporary. docs/qlora.md reads the wide-layer cases of benchmarks/qlora_verify.py with it
(the layers' backward peak memplan over-predicts by 5%).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from torch.distributed._tools import mem_tracker as mt

    from memplan.cli.entry import main as memplan_main

    tracker: Any = mt.MemTracker
    track, update, dispatch = tracker._track, tracker._update_peak_stats, tracker.__torch_dispatch__
    op = [""]
    peak: dict[str, Any] = {"total": 0}

    def _track(self: Any, reftype: Any, t: Any) -> None:
        track(self, reftype, t)
        winfo = self._WINFO.get(t.untyped_storage(), (None, None))[0]
        if winfo is not None and not hasattr(winfo, "made_by"):
            winfo.made_by = f"{op[0]} {tuple(t.shape)} {t.dtype}"

    def _dispatch(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        op[0] = str(func)
        return dispatch(self, func, types, args, kwargs)

    def _update(self: Any, state: Any) -> None:
        update(self, state)
        for snap in self._curr_mem_snap.values():
            if snap[mt._TOTAL_KEY] <= peak["total"]:
                continue
            live = [
                (w.mem_consumed, str(w.reftype), getattr(w, "made_by", "?"))
                for w, _ in list(self._WINFO.values())
                if "TEMP" in str(w.reftype) or "ACT" in str(w.reftype)
            ]
            peak.update(
                total=snap[mt._TOTAL_KEY],
                op=op[0],
                modules=sorted(self._mod_tracker.parents),
                snap={str(k): v for k, v in snap.items()},
                live=sorted(live, reverse=True),
            )

    tracker._track, tracker._update_peak_stats = _track, _update
    tracker.__torch_dispatch__ = _dispatch
    sys.argv = ["memplan", "verify", *args]
    try:
        memplan_main()
    except SystemExit:
        pass
    print(f"peak {peak['total']:,} B at {peak.get('op')}")
    print("modules:", peak.get("modules"))
    print("by reference type:", peak.get("snap"))
    for row in peak.get("live", []):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
