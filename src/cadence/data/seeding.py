"""Random draws inside the data pipeline as part of the data order contract.

A map-style dataset that augments in ``__getitem__`` (a random crop, a random sequence shift) draws from
``random``, ``numpy`` and torch's CPU generator. Left alone, what it draws depends on everything drawn before:
the worker that loads the item, how many items that worker loaded since it started, and, after a resume, how
far the run got. cadence fixes it instead:

- **per item** (``item_seeding=True``, the default): before ``dataset[i]`` of epoch ``e`` is read, the three
  generators are seeded with ``item_seed(seed, e, i)``, so an item's draws depend on nothing else: the same
  with 0 or N workers, at any world size, and after any resume. In the main process (``num_workers=0``) the
  generators' states are put back after the micro-batch's items, so the model's own draws (dropout) go on
  from where they were;
- **per micro-batch, in worker processes**: before the ``collate_fn`` runs in a worker (and, with
  ``item_seeding=False``, before the items are read) the worker's generators are seeded with
  ``batch_seed(seed, e, m)``, ``m`` the micro-batch's number in this rank's epoch, so a resumed run's
  workers draw what the uninterrupted run's did.

``seed`` is the run's seed (for the ``k``-th of several training sources, ``seed + 1_000_003 * k``, as for
its order). The mixing is 64-bit (``_mix``); numpy's legacy generator takes the 32-bit fold
``(s ^ (s >> 32)) & 0xFFFFFFFF`` of it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

_MASK = 2**64 - 1


def _mix(*words: int) -> int:
    """A 64-bit seed from small integers (a splitmix64 finaliser over a multiply-add of the words)."""
    x = 0
    for w in words:
        x = (x * 0x9E3779B97F4A7C15 + (w & _MASK) + 0x632BE59BD9B4E019) & _MASK
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK
        x ^= x >> 31
    return x


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s draws in ``epoch``: ``_mix(seed, epoch, index)``."""
    return _mix(seed, epoch, index)


def batch_seed(seed: int, epoch: int, micro_batch: int) -> int:
    """The seed of a worker's draws for micro-batch ``micro_batch`` of ``epoch`` (its ``collate_fn``)."""
    return _mix(seed, epoch, micro_batch, 0x636F6C6C)  # the last word keeps it apart from item seeds


def seed_generators(value: int) -> None:
    """Seed ``random``, numpy's global generator (with the value's 32-bit fold) and torch's CPU generator."""
    random.seed(value)
    np.random.seed((value ^ (value >> 32)) & 0xFFFFFFFF)  # a 32-bit seed: 6x cheaper than a seed array
    torch.default_generator.manual_seed(value)


def _states() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def _put_back(states: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.default_generator.set_state(states[2])


class SeededItems(Dataset):
    """``data`` read micro-batch by micro-batch with the draws seeded as the module docstring says.

    The sampler gives it keys ``(epoch, micro_batch, indices)``; ``__getitems__`` returns the items, which the
    DataLoader then collates.
    """

    def __init__(self, data: Any, seed: int, per_item: bool) -> None:
        self.data, self.seed, self.per_item = data, seed, per_item

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]

    def __getitems__(self, key: tuple[int, int, Sequence[int]]) -> list[Any]:
        epoch, micro_batch, indices = key
        in_worker = get_worker_info() is not None
        if not self.per_item:
            if in_worker:
                seed_generators(batch_seed(self.seed, epoch, micro_batch))
            return [self.data[i] for i in indices]
        saved = None if in_worker else _states()
        items = []
        for i in indices:
            seed_generators(item_seed(self.seed, epoch, i))
            items.append(self.data[i])
        if in_worker:
            seed_generators(batch_seed(self.seed, epoch, micro_batch))
        else:
            _put_back(saved)
        return items
