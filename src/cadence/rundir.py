"""The run folder: refusing to clobber an earlier run, and trimming its log back to a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .errors import bad

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final")


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to write into an earlier run unless told to; with ``overwrite``, remove what cadence wrote."""
    if run_dir.exists() and not run_dir.is_dir():
        raise bad("run_dir", str(run_dir), "it is a file; choose a folder path.")
    existing = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if existing and not overwrite:
        raise bad("run_dir", str(run_dir), f"it already holds a run ({', '.join(existing)}); continue it with "
                  "resume='auto' (--resume), pick another folder, or pass overwrite=True (--overwrite).")
    for name in existing:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def records_until(path: Path, step: int, count: int | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` written before a checkpoint: its first ``count`` records (or, for a
    checkpoint that does not say, those up to ``step``); the rest are dropped from the file."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if (count is not None and len(kept) < count) or (count is None and record.get("step", 0) <= step):
            kept.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept
