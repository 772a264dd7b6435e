"""One or several training sources, drawn from per optimizer step.

With one source a step is that source's micro-batches. With several (tf-bind's positives, negatives and
scoped negatives), ``mix="each"`` takes one step's worth of micro-batches from every source and the losses
are summed with ``source_weights``; ``mix="sample"`` takes the whole step from one source, picked by weight
with a generator seeded by ``(seed, step)``, so the choice is a pure function of the step and resumes exactly;
``mix="concat"`` joins every source's micro-batch ``m`` into one batch, for one forward (tf-bind's
``collate_dl_outputs``). Each source keeps its own epoch and position; the run's epoch is the first source's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..errors import bad
from .join import join_batches
from .loading import StepStream

MIXES = ("each", "sample", "concat")


class Draw(NamedTuple):
    """The micro-batches one source gives to one step, with the source's name (None alone), its loss weight,
    and the items of its global batch over all ranks (None when unknown: a loader passed in)."""

    source: str | None
    weight: float
    micro_batches: list[Any]
    total: int | None = None


class Sources:
    def __init__(self, streams: Mapping[str | None, StepStream], mix: str = "each",
                 weights: Mapping[str, float] | None = None, seed: int = 0) -> None:
        if mix not in MIXES:
            raise bad("mix", mix, f"use one of {', '.join(MIXES)}.")
        self.streams = dict(streams)
        self.names = list(self.streams)
        self.mix, self.seed = mix, seed
        weights = dict(weights or {})
        if mix == "concat" and weights:
            raise bad("source_weights", weights, "with mix='concat' the sources share one forward and one loss, "
                      "so they cannot be weighted; weight items in the model, or use mix='each'.")
        unknown = set(weights) - set(self.names)
        if unknown:
            raise bad("source_weights", weights, f"{sorted(unknown)} are not sources; the sources are {self.names}.")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.names}
        for name, w in self.weights.items():
            if not w > 0:
                raise bad("source_weights", weights, f"source {name!r} has weight {w}; give every source a "
                          "positive weight, or leave the source out.")
        self._probs = torch.tensor([self.weights[n] for n in self.names], dtype=torch.float64)
        self.draws = 0
        self.first = self.streams[self.names[0]]

    @property
    def single(self) -> bool:
        return len(self.names) == 1

    @property
    def epoch(self) -> int:
        return self.first.epoch

    @property
    def end_of_epoch(self) -> bool:
        return self.first.end_of_epoch

    @property
    def steps_per_epoch(self) -> int | None:
        return self.first.steps_per_epoch if self.single else None

    def next_step(self) -> list[Draw]:
        self.draws += 1
        if self.single:  # plain data (named None), or a dict of one source
            return [self._draw(self.names[0], 1.0)]
        if self.mix == "each":
            return [self._draw(n, self.weights[n]) for n in self.names]
        if self.mix == "concat":
            return [self._concat()]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
        name = self.names[int(torch.multinomial(self._probs, 1, generator=gen)[0])]
        return [self._draw(name, 1.0)]

    def _concat(self) -> Draw:
        """Micro-batch ``m`` of every source (that has one this step) joined into one, in source order."""
        draws = [self._draw(n, 1.0) for n in self.names]
        micro = []
        for m in range(max(len(d.micro_batches) for d in draws)):
            have = [d for d in draws if m < len(d.micro_batches)]
            micro.append(join_batches([d.micro_batches[m] for d in have], [str(d.source) for d in have]))
        totals = [d.total for d in draws]
        return Draw(None, 1.0, micro, None if None in totals else sum(totals))

    def _draw(self, name: str | None, weight: float) -> Draw:
        stream = self.streams[name]
        micro = stream.next_step()
        return Draw(name, weight, micro, stream.last_total())

    def state_dict(self) -> dict[str, Any]:
        if self.single:
            return {**self.first.state_dict(), "draws": self.draws}
        return {"sources": {n: s.state_dict() for n, s in self.streams.items()}, "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.draws = int(state.get("draws", 0))
        if self.single:
            self.first.load_state_dict(state)
        else:
            for name, s in state["sources"].items():
                self.streams[name].load_state_dict(s)

    def close(self) -> None:
        for s in self.streams.values():
            s.close()
