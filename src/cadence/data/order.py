"""The data order contract: which items every optimizer step of every rank sees.

For a map-style dataset of length ``N``:

- epoch ``e`` visits ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))``
  (``range(N)`` when shuffling is off);
- optimizer step ``i`` of the epoch takes the global batch ``perm[i * G:(i + 1) * G]`` with
  ``G = batch_size * grad_accum * world_size``; the last, partial global batch is kept unless ``drop_last``;
- rank ``r`` takes piece ``r`` of ``torch.tensor_split(global_batch, world_size)``, and its micro-batch
  ``m`` is piece ``m`` of ``torch.tensor_split(rank_piece, grad_accum)`` (empty pieces of a short last
  batch are skipped).

The position in the data is therefore just ``(epoch, step_in_epoch)``: resuming needs no replay. With
balanced sampling, the permutation is replaced by ``N`` draws with replacement by per-item weight
(``torch.multinomial(weights, N, replacement=True, generator=...manual_seed(seed + e))``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DataOrder:
    length: int
    batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    weights: torch.Tensor | None = field(default=None, compare=False)  # balanced sampling: draw by weight

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.length, self.global_batch)
        return full if self.drop_last or rest == 0 else full + 1

    def permutation(self, epoch: int) -> torch.Tensor:
        if self.weights is not None:  # N draws with replacement, seeded the same way
            gen = torch.Generator().manual_seed(self.seed + epoch)
            return torch.multinomial(self.weights, self.length, replacement=True, generator=gen)
        if not self.shuffle:
            return torch.arange(self.length)
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))

    def global_indices(self, perm: torch.Tensor, step_in_epoch: int) -> torch.Tensor:
        start = step_in_epoch * self.global_batch
        return perm[start:start + self.global_batch]

    def micro_ranges(self, step_in_epoch: int) -> list[tuple[int, int]]:
        """This rank's micro-batches of one optimizer step as ``(start, stop)`` positions in the permutation.

        ``tensor_split`` of a contiguous run gives contiguous pieces, so every micro-batch is a slice of the
        epoch's permutation; empty pieces of a short last batch are left out.
        """
        start = step_in_epoch * self.global_batch
        stop = min(start + self.global_batch, self.length)
        if stop - start == self.global_batch:  # the common case: equal slices, no splitting
            b = self.batch_size
            base = start + self.rank * self.grad_accum * b
            return [(base + m * b, base + (m + 1) * b) for m in range(self.grad_accum)]
        lo, hi = _piece(start, stop, self.world_size, self.rank)
        pieces = (_piece(lo, hi, self.grad_accum, m) for m in range(self.grad_accum))
        return [(a, z) for a, z in pieces if z > a]

    def epoch_ranges(self, start_step: int = 0) -> list[tuple[int, int]]:
        """``micro_ranges`` of every step of the epoch from ``start_step`` on, in order, built in one pass."""
        g, b, a = self.global_batch, self.batch_size, self.grad_accum
        full = min(self.length // g, self.steps_per_epoch)  # steps with a whole global batch
        first = self.rank * a * b
        ranges = [(i * g + first + m * b, i * g + first + (m + 1) * b) for i in range(start_step, full)
                  for m in range(a)]
        for i in range(max(start_step, full), self.steps_per_epoch):  # the short last step, if kept
            ranges += self.micro_ranges(i)
        return ranges

    def micro_batches(self, perm: torch.Tensor, step_in_epoch: int) -> list[torch.Tensor]:
        """This rank's micro-batch index tensors for one optimizer step (views into ``perm``)."""
        return [perm[a:z] for a, z in self.micro_ranges(step_in_epoch)]


def _piece(start: int, stop: int, parts: int, i: int) -> tuple[int, int]:
    """Piece ``i`` of ``torch.tensor_split(range(start, stop), parts)``: the first ``n % parts`` pieces get one more."""
    size, extra = divmod(stop - start, parts)
    a = start + i * size + min(i, extra)
    return a, a + size + (1 if i < extra else 0)
