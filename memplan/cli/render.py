"""What every view shares: the console and the one place that converts bytes to KiB/MiB/GiB.

The views, one module per command: memplan.cli.estimate_view (and its timeline,
memplan.cli.timeline_view), memplan.cli.plan_view and memplan.cli.inventory_view.
"""

from __future__ import annotations

from rich.console import Console

# Binary units (IEC): GPU memory is sized in powers of two. Decimal GB only on request.
UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def human(n_bytes: int) -> str:
    """1,610,612,736 -> '1.50 GiB' (binary units, labelled as such)."""
    for unit, size in UNITS:
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:,.2f} {unit}"
    return f"{n_bytes:,} B"


def console(width: int | None = None) -> Console:
    # emoji=False: memplan prints no emoji, and rich would otherwise replace every `:name:` of
    # its 3,600 codes in each cell (`:a:` turns into one) after importing their table (2.4 ms
    # of CPU); the tables of every config and preset, with --ranks and --explain, are the
    # same bytes either way.
    return Console(width=width, highlight=False, soft_wrap=False, emoji=False)
