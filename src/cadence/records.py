"""Where the loop's records go: the history ``fit()`` returns and the loggers (the Trainer adds ``on_log``).

A record is a flat dict (``step``, ``epoch``, ``split``, ``loss``, ``parts``...). The training records come
from the running means, read once per log point; each epoch that ended since the last read also gives a
``train_epoch`` record with its means over the whole epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .history import History
from .loggers.build import build_loggers
from .loggers.jsonl import JsonlLogger
from .metrics import StepMeans
from .rundir import records_until

# Keys of the loss and the gradient norm among the running means: they cannot clash with a part's name.
LOSS, GRAD_NORM = " loss", " grad_norm"


class Records:
    def __init__(self) -> None:
        self.history = History()
        self.running = StepMeans()
        self.loggers: list[Any] = []
        self._samples = 0
        self._start = self._last = time.perf_counter()

    def open(self, names: Sequence[str], run_dir: Path, config: dict[str, Any], step: int,
             resumed_records: int | None = None, resumed: bool = False) -> None:
        """Open the loggers (once); after a resume, the history is first read back up to the checkpoint."""
        if self.loggers:
            return
        if resumed:
            self.history[:] = records_until(run_dir / "metrics.jsonl", step, resumed_records)
        self.loggers = build_loggers(names, run_dir, config, start_step=step)

    def start_clock(self) -> None:
        self._start = self._last = time.perf_counter()
        self._samples = 0

    def add_step(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor | None,
                 samples: int) -> None:
        """One step's values, kept on the device until the next log point."""
        self._samples += samples
        self.running.add(LOSS, loss)
        for name, value in parts.items():
            self.running.add(name, value)
        if grad_norm is not None:
            self.running.add(GRAD_NORM, grad_norm)

    def log_train(self, step: int, epoch: int, lr: float,
                  mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """Read the running means (one transfer): the summary of each epoch that ended, then the training record
        of this log point (none when no step ran since the last one). The caller emits them."""
        if not self.running:
            return []
        values, epochs = self.running.read(mean)
        out = []
        for end_step, end_epoch, means in epochs:
            means.pop(GRAD_NORM, None)
            out.append({"step": end_step, "epoch": end_epoch, "split": "train_epoch", "loss": means.pop(LOSS),
                        "parts": means})
        if not values:
            return out
        now = time.perf_counter()
        record = {
            "step": step,
            "epoch": epoch,
            "split": "train",
            "loss": values.pop(LOSS),
            **({"grad_norm": values.pop(GRAD_NORM)} if GRAD_NORM in values else {}),
            "parts": values,
            "lr": lr,
            "samples_per_s": self._samples / max(now - self._last, 1e-9),
            "elapsed_s": now - self._start,
        }
        self._last, self._samples = now, 0
        return [*out, record]

    def emit(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        for logger in self.loggers:
            logger.log(record)

    @contextmanager
    def outside_fit(self, run_dir: Path | None) -> Iterator[None]:
        """Records emitted while no loggers are open (a ``validate()``/``test()`` before or after ``fit()``)
        are appended to ``run_dir/metrics.jsonl`` (``None``: history only); trackers are not reopened."""
        if self.loggers or run_dir is None:
            yield
            return
        self.loggers = [JsonlLogger(run_dir / "metrics.jsonl")]
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []
