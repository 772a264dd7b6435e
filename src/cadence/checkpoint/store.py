"""The checkpoints of one run: naming, finding the newest valid one, and retention."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from .format import TMP_PREFIX, CheckpointError, read_json, verify

NAME = re.compile(r"^step-(\d{9})$")


class Checkpoints:
    """``RUN/checkpoints/step-000001200/`` folders, newest last.

    ``keep_last`` keeps the newest N; ``keep_best=(metric, "min"|"max")`` also keeps the one with the best
    value of ``metric`` at its save. Old checkpoints are removed only after a new one is committed, and only
    folders whose manifest says cadence wrote them.
    """

    def __init__(self, root: str | Path, keep_last: int | None = None,
                 keep_best: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:09d}"

    def folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        self._recover()
        return sorted(p for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name))

    def _recover(self) -> None:
        """Put back a checkpoint that a re-save of the same step had moved aside when a crash hit between
        its two renames (``.tmp-old-step-N-PID`` with no ``step-N``)."""
        for old in self.root.glob(f"{TMP_PREFIX}old-step-*"):
            name = old.name[len(TMP_PREFIX) + len("old-"):].rsplit("-", 1)[0]
            if NAME.match(name) and not (self.root / name).exists():
                os.replace(old, self.root / name)

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies; broken ones are skipped with a warning."""
        for folder in reversed(self.folders()):
            try:
                return folder, verify(folder)
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint {err}; using the previous one", stacklevel=2)
        return None

    def prune(self) -> None:
        """Apply ``keep_last``/``keep_best`` and clear stray temporary folders of interrupted saves."""
        if self.root.is_dir():
            self._recover()
            for stray in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stray, ignore_errors=True)
        if self.keep_last is None:
            return
        folders = [f for f in self.folders() if written_by_cadence(f)]  # a user's folder is never counted
        keep = set(folders[-self.keep_last:]) if self.keep_last > 0 else set()
        best = self._best(folders)
        if best is not None:
            keep.add(best)
        for folder in folders:
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def best(self) -> Path | None:
        """The checkpoint kept for ``keep_best`` (the best value of its metric among cadence's), or None."""
        return self._best([f for f in self.folders() if written_by_cadence(f)])

    def check_best(self, metrics: dict[str, float]) -> None:
        """At a validation: ``keep_best``'s metric must be among the logged names (else nothing could ever be
        kept as the best, and keep_last would delete it)."""
        if self.keep_best is not None and self.keep_best[0] not in metrics:
            from ..errors import bad

            raise bad("keep_best", tuple(self.keep_best), f"{self.keep_best[0]!r} is never logged; the logged names "
                      f"are {', '.join(sorted(metrics))}.")

    def best_after(self, step: int, metrics: dict[str, float]) -> dict[str, Any] | None:
        """``{"step": N, "value": v}``: the checkpoint ``keep_best`` keeps once the save of ``step`` (with these
        validation ``metrics``) is written. It goes into that save's ``trainer.json``, so that ``cadence export
        --best`` can tell when the best checkpoint was removed since, rather than take the next best silently."""
        if self.keep_best is None:
            return None
        metric, mode = self.keep_best
        scored = self._scores([f for f in self.folders() if written_by_cadence(f) and f != self.path(step)])
        value = metrics.get(metric)
        if value is not None:
            scored.append((value if mode == "min" else -value, self.path(step)))
        if not scored:
            return None
        key, folder = min(scored)
        return {"step": int(folder.name.split("-")[1]), "value": key if mode == "min" else -key}

    def _scores(self, folders: list[Path]) -> list[tuple[float, Path]]:
        metric, mode = self.keep_best or ("", "min")
        scored = []
        for folder in folders:
            try:
                value = read_json(folder / "trainer.json").get("metrics", {}).get(metric)
            except CheckpointError:
                continue
            if value is not None:
                scored.append((value if mode == "min" else -value, folder))
        return scored

    def _best(self, folders: list[Path]) -> Path | None:
        if self.keep_best is None:
            return None
        scored = self._scores(folders)
        return min(scored)[1] if scored else None


def written_by_cadence(folder: Path) -> bool:
    """Whether the folder's manifest says cadence wrote it (a user's folder is never removed)."""
    try:
        return read_json(folder / "manifest.json").get("writer") == "cadence"
    except CheckpointError:
        return False


def find_resume(resume: str | Path, checkpoints: Checkpoints | None) -> Path | None:
    """The checkpoint folder that ``resume`` names: ``"auto"`` is the newest valid one of this run (or none,
    to start fresh); a path is a checkpoint folder or a run folder (then its newest valid checkpoint)."""
    from ..errors import bad

    if str(resume) == "auto":
        if checkpoints is None:
            raise bad("resume", "auto", "resuming needs the run folder; pass run_dir=... too.")
        found = checkpoints.latest()
        return found[0] if found else None
    path = Path(resume)
    if (path / "manifest.json").exists():
        verify(path)
        return path
    found = Checkpoints(path / "checkpoints").latest()
    if found is None:
        raise bad("resume", str(path), "it holds no valid checkpoint; give a run folder with checkpoints/ or a "
                  "checkpoint folder (RUN/checkpoints/step-NNNNNNNNN), or resume='auto'.")
    return found[0]
