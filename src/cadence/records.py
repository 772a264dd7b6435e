"""The path of a logged record: a step's values -> running means -> a record at each log point -> the history
``fit()`` returns and the loggers (the Trainer adds ``on_log``).

A record is a flat dict (``step``, ``epoch``, ``split``, ``loss``, ``parts``...). The training records come
from the running means (``StepMeans``), read once per log point; each epoch that ended since the last read also
gives a ``train_epoch`` record with its means over the whole epoch. ``History`` is what ``fit()`` returns and
``Metrics`` what ``validate()`` reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .loggers.build import build_loggers
from .loggers.jsonl import JsonlLogger
from .rundir import records_until
from .throughput import Throughput


# -- running means: kept on the device between log points, read with one host transfer
class StepMeans:
    """Running means that stay on the device between log points and are read with one host transfer.

    Adding a step's value costs a list append (no kernel launch). At a log point every value since the last
    one is read in a single transfer; the host then computes the log window's means and, from the epoch ends
    marked in between, each finished epoch's means, so epoch summaries cost no extra device work or sync.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {}
        self._marks: list[tuple[int, int, dict[str, int]]] = []  # epoch ends: (step, epoch, list lengths)
        self._epoch_sums: dict[str, float] = {}
        self._epoch_counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        values = self._values.get(name)
        if values is None:
            self._values[name] = [value]
        else:
            values.append(value)

    def mark_epoch_end(self, step: int, epoch: int) -> None:
        """Remember where an epoch ended; its means come out of the next ``read()``."""
        self._marks.append((step, epoch, {n: len(v) for n, v in self._values.items()}))

    def __bool__(self) -> bool:
        return bool(self._values) or bool(self._marks)

    def read(self, mean: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[dict[str, float], list[tuple[int, int, dict[str, float]]]]:
        """The means since the last read, and ``(step, epoch, means)`` of every epoch that ended since.

        With ``mean`` (the strategy's mean over the ranks), every value is first averaged over the ranks.
        """
        names = [n for n, v in self._values.items() if v]
        flat_t = torch.cat([torch.stack(self._values[n]).float().reshape(-1) for n in names]) if names else None
        if flat_t is not None and mean is not None:
            flat_t = mean(flat_t)
        flat = flat_t.tolist() if flat_t is not None else []
        host: dict[str, list[float]] = {}
        start = 0
        for n in names:
            count = len(self._values[n])
            host[n], start = flat[start:start + count], start + count
        window = {n: sum(v) / len(v) for n, v in host.items()}
        epochs = []
        done = dict.fromkeys(host, 0)
        for step, epoch, lengths in self._marks:
            for n in host:
                self._fold(n, host[n][done[n]:lengths.get(n, 0)])
                done[n] = lengths.get(n, 0)
            epochs.append((step, epoch, {n: self._epoch_sums[n] / self._epoch_counts[n]
                                         for n in self._epoch_sums if self._epoch_counts[n]}))
            self._epoch_sums, self._epoch_counts = {}, {}
        for n in host:
            self._fold(n, host[n][done[n]:])
        self._values, self._marks = {}, []
        return window, epochs

    def _fold(self, name: str, values: list[float]) -> None:
        if values:
            self._epoch_sums[name] = self._epoch_sums.get(name, 0.0) + sum(values)
            self._epoch_counts[name] = self._epoch_counts.get(name, 0) + len(values)

    # -- checkpoints: the values not yet read, and the epoch sums so far
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {n: torch.stack(v).detach().to("cpu") for n, v in self._values.items() if v}

    def state_json(self) -> dict[str, Any]:
        return {"marks": self._marks, "epoch_sums": self._epoch_sums, "epoch_counts": self._epoch_counts}

    def state_dict(self) -> dict[str, Any]:
        """The values since the last log point (tensors) and the epoch marks and sums (numbers)."""
        return {**self.state_json(), "values": self.state_tensors()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_state(dict(state.get("values") or {}), state)

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any] | None) -> None:
        self._values = {n: list(t.unbind()) for n, t in tensors.items()}
        if state:
            self._marks = [(int(s), int(e), dict(lengths)) for s, e, lengths in state["marks"]]
            self._epoch_sums = dict(state["epoch_sums"])
            self._epoch_counts = {k: int(v) for k, v in state["epoch_counts"].items()}


# -- what fit() returns and validate() reports
class History(list):
    """The logged records in order (the same objects ``metrics.jsonl`` holds).

    ``history[i]`` is a record; ``history["val/loss"]`` is the series of one metric, read from the records of
    its split (``"train/loss"``, ``"train/<part>"``, ``"val/acc"``, ``"val/<set>/loss"``, ``"lr"``...).
    """

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, str):
            return super().__getitem__(key)
        if "/" not in key:
            return [r[key] for r in self if key in r]
        out = []
        for r in self:
            split = r.get("split")  # "val/<set>" of several validation sets has a "/" too
            if not isinstance(split, str) or not key.startswith(f"{split}/"):
                continue
            name = key[len(split) + 1:]
            value = r.get(name, r.get("parts", {}).get(name))
            if value is not None:
                out.append(value)
        return out

    def last(self, split: str) -> dict[str, Any] | None:
        """The newest record of ``split`` ("train" or "val") with a loss (events such as a stop are skipped)."""
        for r in reversed(self):
            if r.get("split") == split and "loss" in r and "event" not in r:
                return r
        return None


class Metrics(dict):
    """Validation metrics keyed ``val/<name>`` (``test/<name>`` from ``test()``: ``split``); a bare name
    (``metrics["loss"]``) finds ``<split>/<name>`` too."""

    split = "val"

    def __missing__(self, key: str) -> float:
        if isinstance(key, str) and not key.startswith(f"{self.split}/") and f"{self.split}/{key}" in self:
            return self[f"{self.split}/{key}"]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or (isinstance(key, str) and super().__contains__(f"{self.split}/{key}"))


# -- the records of a run: built at each log point, sent to the history and the loggers
# Keys of the loss and the gradient norm among the running means: they cannot clash with a part's name.
LOSS, GRAD_NORM = " loss", " grad_norm"


class Records:
    def __init__(self, throughput: Throughput | None = None) -> None:
        self.history = History()
        self.running = StepMeans()
        self.loggers: list[Any] = []
        self.throughput = throughput if throughput is not None else Throughput()
        self._samples = 0
        self._tokens: int | None = None
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
        self._samples, self._tokens = 0, None

    def add_step(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor | None,
                 samples: int) -> None:
        """One step's values, kept on the device until the next log point (its tokens: ``throughput.measure``)."""
        self._samples += samples
        if self.throughput.step_tokens is not None:
            self._tokens = (self._tokens or 0) + self.throughput.step_tokens
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
        seconds = max(now - self._last, 1e-9)
        record = {
            "step": step,
            "epoch": epoch,
            "split": "train",
            "loss": values.pop(LOSS),
            **({"grad_norm": values.pop(GRAD_NORM)} if GRAD_NORM in values else {}),
            "parts": values,
            "lr": lr,
            "samples_per_s": self._samples / seconds,
            **self.throughput.rates(self._samples, self._tokens, seconds),  # tokens_per_s, mfu
            "elapsed_s": now - self._start,
        }
        self._last, self._samples, self._tokens = now, 0, None
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
