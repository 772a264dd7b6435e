"""Named kill points: a test-only way to SIGKILL a run exactly at one place of one step.

``CADENCE_KILL_AT=NAME@STEP`` (read once, when cadence is imported) kills the process with SIGKILL the first
time the point ``NAME`` is reached at trainer step ``STEP``; ``NAME@STEP#N`` the N-th time (1-based: the N-th
micro-batch, validation batch, file or record of that step), ``NAME`` alone at whatever step comes first, and a
``:RANK`` suffix only on that rank. Unset (always, outside tests), every point is one test of the module flag
``ACTIVE``, which call sites check before calling :func:`reached`.

The step of a point is the trainer's ``step`` when it is reached: inside a step (``step.*``) the step being
taken, ``step`` + 1; a checkpoint's points the step it saves; the start-up points before a resume has loaded
anything, 0.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Every point, in the order a run meets them (docs/checkpoints.md, "Kill points").
POINTS = {
    "start": "fit() called, before the run folder is locked",
    "locked": "the run folder is locked, nothing read yet",
    "resume.found": "the checkpoint to resume from is chosen, nothing loaded",
    "resume.loaded": "the checkpoint is loaded into the trainer, nothing written",
    "metrics.truncate": "on resume, before metrics.jsonl is cut back to the checkpoint's records",
    "metrics.truncated": "on resume, after metrics.jsonl is cut back",
    "started": "config.yaml written and the loggers open, before the first step",
    "step.begin": "the step's batches drawn, nothing computed",
    "step.forward": "inside a step, after the forward of a micro-batch (#N: the N-th)",
    "step.backward": "inside a step, after the backward of a micro-batch (#N: the N-th)",
    "step.optimizer": "inside a step, after the optimizer step, before the step counts",
    "step.end": "after the step and what follows it (EMA, running means, on_step_end)",
    "metrics.write": "after a record is appended to metrics.jsonl (#N: the N-th at this step)",
    "log": "after the training record of a log point",
    "val.batch": "inside a validation, after a batch (#N: the N-th)",
    "val.end": "after a validation's records, before what it decides",
    "checkpoint.capture": "the checkpoint's state captured, nothing written",
    "checkpoint.file": "a checkpoint file written, not yet fsynced (#N: the N-th)",
    "checkpoint.manifest": "the checkpoint's manifest written, nothing fsynced",
    "checkpoint.fsync": "every file and the folder fsynced, before the rename",
    "checkpoint.rename": "the folder renamed into place, before its parent is fsynced",
    "checkpoint.committed": "the checkpoint committed, before old ones are pruned",
    "checkpoint.prune": "pruning: an old checkpoint moved aside, before it is deleted (#N: the N-th)",
    "end.validated": "the end of the run: the last validation done",
    "end.checkpoint": "the end of the run: the last checkpoint committed",
    "end.final": "the end of the run: final/model.safetensors written, before final/ is complete",
    "end.done": "the end of the run: final/ complete, before the lock is released",
}

ENV = "CADENCE_KILL_AT"
_SPEC = re.compile(r"^(?P<name>[a-z.]+)(?:@(?P<step>\d+))?(?:#(?P<nth>\d+))?(?::(?P<rank>\d+))?$")

ACTIVE = False
_target: tuple[str, int | None, int, int | None] | None = None
_seen: dict[tuple[str, int], int] = {}
_local = threading.local()  # .step: the step given by this thread's last point that gave one


def arm(spec: str | None) -> None:
    """Kill at ``spec`` (the syntax of ``CADENCE_KILL_AT``); None disarms."""
    global ACTIVE, _target
    _seen.clear()
    if not spec:
        ACTIVE, _target = False, None
        return
    match = _SPEC.match(spec.strip())
    if match is None or match["name"] not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: expected NAME[@STEP][#N][:RANK] with NAME one of {', '.join(POINTS)}.")
    step = int(match["step"]) if match["step"] is not None else None
    rank = int(match["rank"]) if match["rank"] is not None else None
    ACTIVE, _target = True, (match["name"], step, int(match["nth"] or 1), rank)


def reached(name: str, step: int | None = None) -> None:
    """The run is at point ``name`` of ``step`` (default: the step this thread's last point gave): SIGKILL
    this process if that is the armed point. Call sites check ``ACTIVE`` first."""
    if step is not None:
        _local.step = step
    if _target is None:
        return
    target, at, nth, rank = _target
    step = getattr(_local, "step", 0)
    if name != target or (at is not None and step != at):
        return
    if rank is not None and int(os.environ.get("RANK", 0)) != rank:
        return
    key = (name, step)
    _seen[key] = _seen.get(key, 0) + 1
    if _seen[key] == nth:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def saving(step: int) -> Iterator[None]:
    """The checkpoint points reached inside (in any thread that writes it) belong to ``step``."""
    before = getattr(_local, "step", 0)
    _local.step = step
    try:
        yield
    finally:
        _local.step = before


arm(os.environ.get(ENV))
