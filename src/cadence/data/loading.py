"""Turn whatever ``train_data`` is into a stream of optimizer steps, each a list of micro-batches.

Three kinds of data, one interface (:class:`StepStream`):

- **in memory** (a tensor, a tuple/list/dict of tensors, a ``TensorDataset``): micro-batches are made by
  indexing the tensors with the order contract's index slices; no ``__getitem__`` per item, no collation;
- **map-style dataset**: a ``DataLoader`` driven by a batch sampler that follows the order contract and can
  start at any ``(epoch, step)`` (so resuming costs no replay);
- **a ``DataLoader`` or iterable passed in** (or an ``IterableDataset``, batched first): used as is,
  ``grad_accum`` consecutive batches per step (``streaming.py``: resumed through its state, or replayed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from ..errors import bad
from .hf import torch_format
from .order import DataOrder
from .seeding import SeededItems

_END = object()


class InMemory:
    """Tensors sharing their first dimension, batched by indexing: ``kind`` says how a batch is shaped."""

    def __init__(self, tensors: Sequence[torch.Tensor], kind: str, keys: Sequence[str] = ()) -> None:
        self.tensors = list(tensors)
        self.kind = kind  # "tensor", "tuple" or "dict"
        self.keys = list(keys)
        n = {len(t) for t in self.tensors}
        if len(n) != 1:
            raise bad("train_data", f"tensors of lengths {sorted(n)}",
                      "in-memory data must be tensors that share their first dimension.")

    def __len__(self) -> int:
        return len(self.tensors[0])

    def take(self, index: torch.Tensor | int) -> Any:
        """The rows ``index`` (a 1-D index tensor; an int gives one item)."""
        if isinstance(index, torch.Tensor):  # index_select: the same rows as t[index], with less dispatch work
            # tensors on a GPU: the index goes over without a host sync (it is not touched again on the host)
            picked = [t.index_select(0, index if index.device == t.device else index.to(t.device, non_blocking=True))
                      for t in self.tensors]
        else:
            picked = [t[index] for t in self.tensors]
        if self.kind == "tensor":
            return picked[0]
        return dict(zip(self.keys, picked)) if self.kind == "dict" else tuple(picked)

    def split(self, batch: Any, sizes: list[int]) -> list[Any]:
        """A batch made by :meth:`take` cut into consecutive batches of ``sizes`` rows (views, no copy)."""
        if self.kind == "tensor":
            return list(batch.split(sizes))
        columns = [t.split(sizes) for t in (batch.values() if self.kind == "dict" else batch)]
        rows = zip(*columns)
        return [dict(zip(self.keys, r)) for r in rows] if self.kind == "dict" else list(rows)

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.tensors)

    def __getitem__(self, i: int) -> Any:  # item view, used by split_by and balance_by
        return self.take(i)

    def subset(self, index: torch.Tensor) -> InMemory:
        return InMemory([t[index] for t in self.tensors], self.kind, self.keys)


def as_in_memory(data: Any) -> InMemory | None:
    """``data`` as an :class:`InMemory` view when it is tensors, else ``None``."""
    if isinstance(data, InMemory):
        return data
    if isinstance(data, TensorDataset) and type(data).__getitem__ is TensorDataset.__getitem__:
        return InMemory(data.tensors, "tuple")  # a subclass with its own __getitem__ goes item by item
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, np.ndarray) for t in data):
        data = [torch.from_numpy(t) for t in data]  # numpy arrays share memory with the tensors made here
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        return InMemory([data], "tensor")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return InMemory(data, "tuple")
    if isinstance(data, Mapping) and data and all(isinstance(t, torch.Tensor) for t in data.values()):
        return InMemory(list(data.values()), "dict", list(data.keys()))
    return None


def is_map_style(data: Any) -> bool:
    """Indexable with a length; an ``IterableDataset`` is not, even with ``__len__`` (it is streamed)."""
    if isinstance(data, IterableDataset):
        return False
    return (isinstance(data, Dataset) and hasattr(data, "__len__")) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
        and not isinstance(data, (str, bytes, Mapping, DataLoader)))


def batch_size_of(batch: Any) -> int:
    """Number of items in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, (tuple, list)):  # before Mapping: an isinstance check against an ABC costs more
        if not batch:
            return 1
        first = batch[0]
        return batch_size_of(first) if isinstance(first, (torch.Tensor, Mapping, tuple, list)) else len(batch)
    if isinstance(batch, Mapping):
        for v in batch.values():
            return batch_size_of(v)
    return 1


class _OrderSampler:
    """Yields this rank's micro-batch index lists for one epoch, from a chosen step on."""

    def __init__(self, order: DataOrder, keyed: bool = False) -> None:
        self.order = order
        self.keyed = keyed  # yield (epoch, micro-batch number, indices) for SeededItems
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[Any]:
        perm = self.order.permutation(self.epoch).tolist()  # one conversion per epoch, list slices per batch
        first = self.start * self.order.grad_accum
        for m, (a, z) in enumerate(self.order.epoch_ranges(self.start), start=first):
            yield (self.epoch, m, perm[a:z]) if self.keyed else perm[a:z]

    def __len__(self) -> int:
        return (self.order.steps_per_epoch - self.start) * self.order.grad_accum


def _empty() -> Exception:
    return bad("train_data", "an epoch with no batches",
               "the training data yielded nothing; check the dataset is not empty.")


class StepStream:
    """Optimizer steps as lists of micro-batches, with the position ``(epoch, step_in_epoch)``.

    ``epoch_iter(epoch, start_step)`` yields the micro-batches of one epoch from ``start_step`` on; every
    step has ``grad_accum`` of them except possibly the epoch's last, which takes what is left.
    """

    def __init__(self, epoch_iter: Callable[[int, int], Iterator[Any]], grad_accum: int,
                 steps_per_epoch: int | None, exact_position: bool, order: DataOrder | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self._epoch_iter = epoch_iter
        self._on_close = on_close
        self.order = order
        self.grad_accum = grad_accum
        self.steps_per_epoch = steps_per_epoch
        self.exact_position = exact_position  # False: a loader passed in; resuming replays batches
        self.epoch = 0
        self.position = 0
        self.end_of_epoch = False
        self._it: Iterator[Any] | None = None
        self._next: Any = _END

    def _open(self) -> None:
        start = self.position if self.exact_position else 0
        self._it = self._epoch_iter(self.epoch, start)
        if not self.exact_position:  # replay: skip the micro-batches already consumed
            for _ in range(self.position * self.grad_accum):
                if next(self._it, _END) is _END:
                    break
        if self.steps_per_epoch is None:  # an epoch of unknown length ends where the iterator does: look ahead
            self._next = next(self._it, _END)
            if self._next is _END and self.position == 0:
                raise _empty()

    def next_step(self) -> list[Any]:
        """The next step's micro-batches (moving to a new epoch first if the last one ended).

        Nothing of the step after is built here: a dataset, ``collate_fn`` or worker seed that draws random
        numbers draws them when that step is taken, after the checkpoint of this one (whose RNG state is then
        the one a resume starts from). Only data of unknown length is read one micro-batch ahead.
        """
        if self.end_of_epoch:
            if self._it is not None:  # run the last epoch's iterator out, as a `for` loop over it would
                next(self._it, _END)
            self.epoch += 1
            self.position = 0
            self.end_of_epoch = False
            self._it = None
        if self._it is None:
            self._open()
        if self.steps_per_epoch is None:
            return self._next_looking_ahead()
        micro = []
        while len(micro) < self.grad_accum:
            batch = next(self._it, _END)
            if batch is _END:
                break
            micro.append(batch)
        if not micro:
            if self.position == 0:
                raise _empty()
            # a loader passed in yielded fewer batches than its len(): its epoch ends here
            self.end_of_epoch = True
            return self.next_step()
        self.position += 1
        self.end_of_epoch = self.position == self.steps_per_epoch or len(micro) < self.grad_accum
        return micro

    def _next_looking_ahead(self) -> list[Any]:
        micro = []
        while len(micro) < self.grad_accum and self._next is not _END:
            micro.append(self._next)
            self._next = next(self._it, _END)
        self.position += 1
        self.end_of_epoch = self._next is _END
        return micro

    def last_total(self) -> int | None:
        """Items in the global batch (all ranks, all micro-batches) of the step just drawn, when known."""
        if self.order is None:
            return None
        g = self.order.global_batch
        return min(g, self.order.length - (self.position - 1) * g)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "end_of_epoch": int(self.end_of_epoch)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.end_of_epoch = bool(state.get("end_of_epoch", 0))
        self._it = None

    def close(self) -> None:
        self._it = None
        if self._on_close is not None:
            self._on_close()


# In-memory data on the host up to this size is gathered once per epoch, in this rank's order, and each
# micro-batch is a contiguous slice of the copy (one gather per epoch instead of one per batch). Larger data,
# and data already on an accelerator (whose memory is scarcer and where a gather is one asynchronous kernel),
# is gathered batch by batch, so it is never held twice.
GATHER_EPOCH_BYTES = 512 * 2**20


def stream_in_memory(data: InMemory, order: DataOrder) -> StepStream:
    whole_epoch = data.nbytes() <= GATHER_EPOCH_BYTES and all(t.device.type == "cpu" for t in data.tensors)

    def epoch_iter(epoch: int, start: int) -> Iterator[Any]:
        perm = order.permutation(epoch)
        ranges = order.epoch_ranges(start)
        if not ranges:
            return
        if not whole_epoch:
            for a, z in ranges:
                yield data.take(perm[a:z])
            return
        if order.world_size == 1:  # this rank's micro-batches follow each other in the permutation
            mine = perm[ranges[0][0]:ranges[-1][1]]
        else:
            mine = torch.cat([perm[a:z] for a, z in ranges])
        yield from data.split(data.take(mine), [z - a for a, z in ranges])

    return StepStream(epoch_iter, order.grad_accum, order.steps_per_epoch, exact_position=True, order=order)


def stream_map_style(data: Dataset, order: DataOrder, collate_fn: Callable | None, num_workers: int,
                     pin_memory: bool, item_seeding: bool = True) -> StepStream:
    seeded = item_seeding or num_workers > 0  # see data/seeding.py
    if seeded:
        data = SeededItems(data, order.seed, per_item=item_seeding)
    sampler = _OrderSampler(order, keyed=seeded)
    if num_workers == 0 and not pin_memory:
        # What a DataLoader does in this process, without its per-batch work around it (a profiler scope and
        # its iterator's checks: about 20 us a batch, 3% of a small model's step)
        collate = collate_fn or stack_items
        fetch = data.__getitems__ if hasattr(data, "__getitems__") else lambda idx: [data[i] for i in idx]

        def read_epoch(epoch: int, start: int) -> Iterator[Any]:
            sampler.epoch, sampler.start = epoch, start
            return (collate(fetch(key)) for key in sampler)

        return StepStream(read_epoch, order.grad_accum, order.steps_per_epoch, exact_position=True, order=order)
    # A private generator keeps the loader from drawing its worker base seed from the global RNG, so the
    # model's random stream (dropout) is the same whether or not a run was resumed.
    generator = torch.Generator()
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate_fn or default_collate,
                        num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                        persistent_workers=num_workers > 0)

    def epoch_iter(epoch: int, start: int) -> Iterator[Any]:
        sampler.epoch, sampler.start = epoch, start
        generator.manual_seed(order.seed * 100_003 + epoch)
        return iter(loader)

    def shut_down_workers() -> None:  # persistent workers end with fit(), not whenever the loader is collected
        workers = getattr(loader, "_iterator", None)
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
            loader._iterator = None

    return StepStream(epoch_iter, order.grad_accum, order.steps_per_epoch, exact_position=True, order=order,
                      on_close=shut_down_workers if num_workers > 0 else None)


def stack_items(batch: list[Any]) -> Any:
    """``default_collate`` of items that are tensors or tuples of tensors, in the main process, without its
    dispatch per field (about 25 us a batch of 64 pairs): the same stacked tensors (a tuple's fields as a list,
    as ``default_collate`` gives them). Anything else goes to ``default_collate``."""
    first = batch[0]
    if type(first) is torch.Tensor and _plain(first):
        return torch.stack(batch)
    if type(first) is tuple and all(type(v) is torch.Tensor and _plain(v) for v in first):
        size = len(first)
        if all(len(item) == size for item in batch):
            return [torch.stack(column) for column in zip(*batch)]
    return default_collate(batch)


def _plain(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_nested


def eval_batches(data: Any, batch_size: int, collate_fn: Callable | None, num_workers: int,
                 pin_memory: bool, rank: int = 0, world_size: int = 1) -> Iterable[Any]:
    """Validation batches in dataset order; with several processes, rank ``r`` takes piece ``r`` of
    ``torch.tensor_split(range(N), world_size)``. An ``IterableDataset`` is batched in its own order (and
    split between ranks only by itself, as in training)."""
    data = torch_format(data)
    mem = as_in_memory(data)
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, collate_fn=collate_fn or default_collate,
                          generator=torch.Generator(), num_workers=num_workers, pin_memory=pin_memory)
    if isinstance(data, DataLoader) or (mem is None and not is_map_style(data)):
        return data
    index = torch.tensor_split(torch.arange(len(mem if mem is not None else data)), world_size)[rank]
    if mem is not None:
        return (mem.take(index[i:i + batch_size]) for i in range(0, len(index), batch_size))
    if world_size > 1:
        data = torch.utils.data.Subset(data, index.numpy().tolist())
    # A private generator: iterating must not draw from the global RNG (it would shift dropout after a resume).
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or default_collate,
                      generator=torch.Generator(), num_workers=num_workers, pin_memory=pin_memory)
