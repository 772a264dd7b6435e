"""The checkpoints of one run: naming, finding the newest valid one, and retention."""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from .. import killpoints
from .format import TMP_PREFIX, CheckpointError, read_json, verify

NAME = re.compile(r"^step-(\d{9})$")


class Checkpoints:
    """``RUN/checkpoints/step-000001200/`` folders, newest last.

    ``keep_best=(metric, "min"|"max")`` keeps the checkpoint with the best value of ``metric`` among those
    saved at a validation (the weights that were measured); the loop saves one at every validation that
    improves on the best (``improves``), marked ``"kept_for": "best"`` in its manifest when no
    ``checkpoint_every`` save fell on that step. ``keep_last`` keeps the newest N of the other checkpoints; a
    best-only checkpoint stays while it is the best. Old checkpoints are removed only after a new one is
    committed, and only folders whose manifest says cadence wrote them.
    """

    def __init__(self, root: str | Path, keep_last: int | None = None,
                 keep_best: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_value: float | None = None  # the best value of keep_best's metric saved so far (resumed too)
        self.best_step: int | None = None  # the step of its checkpoint

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

    def latest(self, keep: bool = True) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies (``keep``: see ``verify``); broken ones are skipped with a warning."""
        for folder in reversed(self.folders()):
            try:
                return folder, verify(folder, keep)
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint {err}; using the previous one", stacklevel=2)
        return None

    def prune(self) -> None:
        """Apply ``keep_last``/``keep_best`` and clear stray temporary folders of interrupted saves."""
        if self.root.is_dir():
            self._recover()
            for stray in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stray, ignore_errors=True)
        if self.keep_last is None and self.keep_best is None:
            return
        folders = [f for f in self.folders() if written_by_cadence(f)]  # a user's folder is never counted
        periodic = [f for f in folders if kept_for(f) != "best"]
        if self.keep_last is None:
            keep = set(periodic)
        else:
            keep = set(periodic[-self.keep_last:]) if self.keep_last > 0 else set()
        best = self._best(folders)
        if best is not None:
            keep.add(best)
        for folder in folders:
            if folder not in keep:
                remove(folder)

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

    def improves(self, metrics: dict[str, float], step: int) -> bool:
        """Whether this validation's value of ``keep_best``'s metric beats every one saved so far (then it is
        remembered: the caller saves a checkpoint at this validation, ``step``)."""
        if self.keep_best is None or self.keep_best[0] not in metrics:
            return False
        metric, mode = self.keep_best
        value = float(metrics[metric])
        if math.isnan(value):
            return False
        if self.best_value is not None and not (value < self.best_value if mode == "min" else value > self.best_value):
            return False
        self.best_value, self.best_step = value, step
        return True

    def best_state(self) -> dict[str, Any] | None:
        """``keep_best``, the best value saved so far and the step of its checkpoint, for every checkpoint:
        ``cadence export --best`` reads the metric from it when the run has no config.yaml, and says when the
        best checkpoint was removed since rather than take the next best silently."""
        if self.keep_best is None:
            return None
        return {"metric": self.keep_best[0], "mode": self.keep_best[1], "value": self.best_value,
                "step": self.best_step}

    def load_best_state(self, state: dict[str, Any] | None) -> None:
        same = bool(state) and self.keep_best is not None \
            and [state.get("metric"), state.get("mode")] == list(self.keep_best)
        self.best_value = state.get("value") if same else None
        self.best_step = state.get("step") if same else None

    def _scores(self, folders: list[Path]) -> list[tuple[float, Path]]:
        """(value, folder) of the checkpoints saved at their validation's step (whose weights are the validated
        ones; a checkpoint saved steps after a validation holds other weights than those measured)."""
        metric, mode = self.keep_best or ("", "min")
        scored = []
        for folder in folders:
            try:
                state = read_json(folder / "trainer.json")
            except CheckpointError:
                continue
            value = state.get("metrics", {}).get(metric)
            if value is not None and state.get("validated_at") == state.get("step") and not math.isnan(value):
                scored.append((value if mode == "min" else -value, folder))
        return scored

    def _best(self, folders: list[Path]) -> Path | None:
        if self.keep_best is None:
            return None
        scored = self._scores(folders)
        return min(scored)[1] if scored else None


def kept_for(folder: Path) -> str | None:
    """Why a checkpoint was saved besides ``checkpoint_every`` (``"best"``: at a best validation), from its
    manifest; None for a periodic (or end-of-run, or signal) checkpoint."""
    try:
        return read_json(folder / "manifest.json").get("kept_for")
    except CheckpointError:
        return None


def written_by_cadence(folder: Path) -> bool:
    """Whether the folder's manifest says cadence wrote it (a user's folder is never removed)."""
    try:
        return read_json(folder / "manifest.json").get("writer") == "cadence"
    except CheckpointError:
        return False


def find_resume(resume: str | Path, checkpoints: Checkpoints | None, keep: bool = True) -> Path | None:
    """The checkpoint folder that ``resume`` names: ``"auto"`` is the newest valid one of this run (or none,
    to start fresh); a path is a checkpoint folder or a run folder (then its newest valid checkpoint). ``keep``:
    the process loads it alone, so what is verified is kept for the load (``verify``)."""
    from ..errors import bad

    if str(resume) == "auto":
        if checkpoints is None:
            raise bad("resume", "auto", "resuming needs the run folder; pass run_dir=... too.")
        found = checkpoints.latest(keep)
        return found[0] if found else None
    path = Path(resume)
    if (path / "manifest.json").exists():
        verify(path, keep)
        return path
    found = Checkpoints(path / "checkpoints").latest(keep)
    if found is None:
        raise bad("resume", str(path), "it holds no valid checkpoint; give a run folder with checkpoints/ or a "
                  "checkpoint folder (RUN/checkpoints/step-NNNNNNNNN), or resume='auto'.")
    return found[0]


def remove(folder: Path) -> None:
    """Delete a checkpoint folder as one step: renamed aside first (a crash mid-delete leaves a stray temporary
    folder, cleared by the next prune, never a half-deleted checkpoint), then deleted."""
    aside = folder.with_name(f"{TMP_PREFIX}del-{folder.name}-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except OSError:
        return
    if killpoints.ACTIVE:
        killpoints.reached("checkpoint.prune")
    shutil.rmtree(aside, ignore_errors=True)
