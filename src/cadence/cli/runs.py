"""``cadence runs [DIR]``: a table of the runs in a folder: name, status, step, best validation value, wall time."""

from __future__ import annotations

from typing import Any


def runs(cfg: Any) -> int:
    from ..errors import bad
    from ..runs import find_runs, format_table, summarize_or_unreadable

    if cfg.mode not in ("min", "max"):
        raise bad("--mode", cfg.mode, 'use "min" (lower is better, e.g. val/loss) or "max" (e.g. val/acc).')
    rows = [summarize_or_unreadable(path, cfg.metric, cfg.mode) for path in find_runs(cfg.dir)]
    print(format_table(rows, cfg.metric))
    return 0
