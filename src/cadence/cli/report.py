"""``cadence report RUN [RUN ...] [-o FILE]``: one self-contained HTML page with the runs' curves and configs."""

from __future__ import annotations

from typing import Any


def report(cfg: Any) -> int:
    from ..report import write_report

    path = write_report(cfg.runs, cfg.output, overwrite=cfg.overwrite)
    print(f"wrote {path}")
    return 0
