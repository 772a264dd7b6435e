"""Running means that stay on the device between log points and are read with one host transfer.

Adding a step's value costs a list append (no kernel launch). At a log point every value since the last one
is read in a single transfer; the host then computes the log window's means and, from the epoch ends marked
in between, each finished epoch's means, so epoch summaries cost no extra device work or sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class StepMeans:
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
