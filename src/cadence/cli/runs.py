"""``cadence runs [DIR]``: a table of the runs in a folder: name, status, step, best validation value, wall time."""

from __future__ import annotations

import sys
import warnings
from typing import Any


def runs(cfg: Any) -> int:
    from ..errors import bad
    from ..runs import find_runs, format_table, summarize_or_unreadable

    if cfg.mode not in ("min", "max"):
        raise bad("--mode", cfg.mode, 'use "min" (lower is better, e.g. val/loss) or "max" (e.g. val/acc).')
    rows = [summarize_or_unreadable(path, cfg.metric, cfg.mode) for path in find_runs(cfg.dir)]
    print(format_table(rows, cfg.metric))
    if not any(r.best is not None for r in rows):
        names = logged(rows)
        if names and cfg.metric not in names:  # a typo, or another split: say so rather than a column of "-"
            print(f"cadence: warning: no run here logs {cfg.metric!r}; they log {', '.join(sorted(names))} "
                  "(--metric NAME)", file=sys.stderr)
    return 0


def logged(rows: list[Any]) -> set[str]:
    """Every series the readable runs among ``rows`` log."""
    from ..runs import logged_names, read_records

    names: set[str] = set()
    for row in rows:
        path = row.path / "metrics.jsonl"
        if row.status != "unreadable" and path.is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a damaged line was said once already, in the table's pass
                names |= logged_names(read_records(row.path))
    return names
