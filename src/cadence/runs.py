"""Reading run folders back: their records, config and status, for ``cadence runs`` and ``cadence report``.

A run folder is what ``cadence fit`` (or ``Trainer(run_dir=...)``) writes: ``config.yaml``, ``metrics.jsonl``,
``checkpoints/`` and, once training ends, ``final/model.safetensors``. Nothing here needs the model or data.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import bad

# A run whose metrics.jsonl changed this recently (and that has not finished) counts as running.
ACTIVE_MINUTES = 15.0
TOP_LEVEL = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu")  # a record's own keys, not parts


@dataclass
class RunSummary:
    """One row of the runs table."""

    name: str
    path: Path
    status: str  # "running", "finished", "stopped", "crashed" or "unreadable"
    step: int | None
    max_steps: int | None
    best: float | None  # the best value of the chosen validation metric
    best_step: int | None
    wall_s: float | None


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``, in order; damaged lines (a line cut short by a crash, garbage, a
    non-numeric step) are skipped with one warning naming the file. The one reader, for every tool."""
    from .loggers.jsonl import read_jsonl

    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_config(run_dir: Path) -> dict[str, Any]:
    """``RUN/config.yaml`` as a dict; empty when the run was started from Python without one."""
    import yaml  # here, so that the Trainer may import this module and ``import cadence`` stays light

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def require_run(path: str | Path, argument: str = "run") -> Path:
    """``path`` as a run folder that holds records, or the ConfigError that says what to give instead."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise bad(argument, str(path), "no such folder; give the folder of a run that cadence fit started "
                  "(see `cadence runs`).")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or not read_records(run_dir):
        what = "no records in metrics.jsonl yet" if metrics.is_file() else "no metrics.jsonl there"
        raise bad(argument, str(path), f"{what}; give the folder of a run that cadence fit started and that "
                  "reached its first log point (every log_every steps).")
    return run_dir


def find_runs(folder: str | Path) -> list[Path]:
    """``folder`` itself if it is a run, else the runs directly inside it, sorted by name (oldest first)."""
    root = Path(folder)
    if not root.is_dir():
        raise bad("dir", str(folder), "no such folder; give a folder of runs (default: runs).")
    if _is_run(root):
        return [root]
    runs = sorted(p for p in root.iterdir() if p.is_dir() and _is_run_or_unreadable(p))
    if not runs:
        raise bad("dir", str(folder), "it holds no run folders (none with metrics.jsonl or config.yaml); give "
                  "the folder that cadence fit writes runs into (default: runs) or a run folder.")
    return runs


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()


def _is_run_or_unreadable(path: Path) -> bool:
    """A run folder, or one that cannot be looked into (listed as unreadable, with a warning, never skipped)."""
    try:
        return _is_run(path)
    except OSError:
        return True


def logged_names(records: list[dict[str, Any]]) -> set[str]:
    """The series :func:`metric_series` can read from ``records``: ``train/loss``, ``val/acc``, ``lr``, ..."""
    names = set()
    for r in records:
        if "loss" not in r:
            continue
        split = r.get("split")
        prefix = f"{split}/" if split else ""
        names.update(f"{prefix}{k}" for k in ("loss", *(r.get("parts") or {})))
        names.update(k for k in ("lr", "grad_norm", "samples_per_s") if isinstance(r.get(k), (int, float)))
    return names


def status(run_dir: Path, records: list[dict[str, Any]], now: float | None = None,
           active_minutes: float = ACTIVE_MINUTES) -> str:
    """finished (final weights written after the last record), stopped, running, or crashed.

    running: a live process holds the run's lock (``RUN/.lock``), or, not finished, ``metrics.jsonl`` changed in
    the last ``active_minutes``; stopped: the last record is a ``"stop"`` event (a signal, or early stopping that
    ended before the final weights were written).
    """
    now = time.time() if now is None else now
    if training_pid(run_dir) is not None:
        return "running"
    final = run_dir / "final" / "model.safetensors"
    metrics = run_dir / "metrics.jsonl"
    last_write = max((p.stat().st_mtime for p in (metrics, run_dir / "config.yaml") if p.exists()), default=0.0)
    if final.is_file() and final.stat().st_mtime >= last_write - 1.0:
        return "finished"
    if records and records[-1].get("event") == "stop":  # e.g. {"event": "stop", "reason": "signal 15"}
        return "stopped"
    if now - last_write < active_minutes * 60:
        return "running"
    return "crashed"


def training_pid(run_dir: Path) -> int | None:
    """The PID in ``RUN/.lock`` when that process is alive on this machine (the lock file exists only while a
    process trains, or after one was killed)."""
    import os

    try:
        pid = int((run_dir / ".lock").read_text().strip())
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        return pid
    except (OSError, ValueError):
        return None
    return pid


def wall_time(records: list[dict[str, Any]]) -> float | None:
    """Seconds spent training, summed over attempts (``elapsed_s`` restarts at each resume)."""
    total, last = 0.0, None
    for r in records:
        elapsed = r.get("elapsed_s")
        if elapsed is None:
            continue
        if last is not None and elapsed < last:
            total += last
        last = elapsed
    return None if last is None else total + last


def metric_series(records: list[dict[str, Any]], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one series: ``train/loss``, ``val/acc``, ``lr``, ``samples_per_s``, ..."""
    split, _, key = name.rpartition("/")
    out = []
    for r in records:
        if "loss" not in r or (split and r.get("split") != split):
            continue
        value = r.get(key) if key in TOP_LEVEL else (r.get("parts") or {}).get(key)
        if isinstance(value, (int, float)):
            out.append((int(r["step"]), float(value)))
    return out


def summarize(run_dir: Path, metric: str = "val/loss", mode: str = "min", now: float | None = None) -> RunSummary:
    """The runs table row of one run folder."""
    records = read_records(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    steps = [int(r["step"]) for r in records if "step" in r]
    best = best_step = None
    values = [(v, s) for s, v in metric_series(records, metric) if not math.isnan(v)]
    if values:
        best, best_step = (min if mode == "min" else max)(values, key=lambda vs: vs[0])
    max_steps = (read_config(run_dir).get("trainer") or {}).get("max_steps")
    return RunSummary(run_dir.name, run_dir, status(run_dir, records, now), max(steps) if steps else None,
                      max_steps if isinstance(max_steps, int) else None, best, best_step, wall_time(records))


def summarize_or_unreadable(run_dir: Path, metric: str = "val/loss", mode: str = "min") -> RunSummary:
    """:func:`summarize`, or a row with status ``"unreadable"`` (and a warning saying why), so that one damaged
    run never hides the others."""
    try:
        return summarize(run_dir, metric, mode)
    except Exception as err:  # a config.yaml that is not YAML, a file that cannot be read, ...
        warnings.warn(f"{run_dir}: cannot read the run ({type(err).__name__}: {str(err)[:120]})", stacklevel=2)
        return RunSummary(run_dir.name, run_dir, "unreadable", None, None, None, None, None)


def format_duration(seconds: float | None) -> str:
    """``3725.2`` -> ``"1:02:05"``, ``8.27`` -> ``"8.3 s"``, ``None`` -> ``"-"``."""
    if seconds is None:
        return "-"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_table(rows: list[RunSummary], metric: str = "val/loss") -> str:
    """The runs as an aligned text table, one line per run."""
    header = ["name", "status", "step", f"best {metric}", "wall"]
    lines = [header]
    for r in rows:
        step = "-" if r.step is None else f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step)
        best = "-" if r.best is None else f"{r.best:.4g} @{r.best_step}"
        lines.append([r.name, r.status, step, best, format_duration(r.wall_s)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
