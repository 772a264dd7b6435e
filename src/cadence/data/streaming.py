"""Iterables as training data: streams that keep their own state, and streams that are replayed.

An iterable has no index, so the data order contract cannot place a resumed run in it. Two ways out:

- it provides ``state_dict()``/``load_state_dict()`` (an ``IterableDataset`` written so, torchdata's
  ``StatefulDataLoader``, any object): its state, read when exactly the micro-batches of the steps taken so
  far have left it, is part of the stream's state, and a resumed run loads it and iterates on from there;
- it does not: a resumed run iterates again from the epoch's start and skips what was consumed (a one-time
  warning says so), which is exact only when the iterable yields the same batches again.

An ``IterableDataset`` yields items, so it is batched by a ``DataLoader`` (``batch_size``, ``collate_fn``,
``num_workers``, ``drop_last``); a ``DataLoader`` or any other iterable yields batches and is used as is.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from ..errors import bad
from .loading import StepStream

_END = object()


def has_state(obj: Any) -> bool:
    """Whether ``obj`` can save and load its position: ``state_dict()`` and ``load_state_dict(state)``."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _steps(iterable: Iterable, grad_accum: int) -> int | None:
    try:
        return -(-len(iterable) // grad_accum)  # type: ignore[arg-type]
    except TypeError:  # no __len__ (or an IterableDataset's loader whose dataset has none)
        return None


class StatefulStream(StepStream):
    """Steps from an iterable whose position lives in ``holder.state_dict()`` (``holder`` is the iterable, or
    the ``IterableDataset`` that a ``DataLoader`` batches in this process).

    The saved state is that of the micro-batches handed out: where the stream reads one micro-batch ahead
    (an epoch of unknown length), the holder's state is copied before that read; at the end of an epoch of
    known length the iterator is run to its end, so that the saved state is the finished epoch's (what a
    ``StatefulDataLoader`` needs to start the next one after a resume).
    """

    def __init__(self, iterable: Iterable, holder: Any, grad_accum: int,
                 on_close: Callable[[], None] | None = None, on_epoch: Callable[[int], None] | None = None) -> None:
        self._iterable, self._holder, self._on_epoch = iterable, holder, on_epoch
        self._loaded: Any = None  # a checkpoint's state, loaded into the holder when the epoch is opened
        self._source: Iterator[Any] | None = None
        self._exhausted = False
        self._before: Any = _END  # the holder's state before the last read (epochs of unknown length)
        super().__init__(self._epoch, grad_accum, _steps(iterable, grad_accum), exact_position=True,
                         on_close=on_close)

    def _epoch(self, epoch: int, start: int) -> Iterator[Any]:
        if self._on_epoch is not None:
            self._on_epoch(epoch)
        if self._loaded is not None:
            self._holder.load_state_dict(self._loaded)
            self._loaded = None
        source = self._source = iter(self._iterable)
        self._exhausted, self._before = False, _END
        look_ahead, pulled = self.steps_per_epoch is None, 0
        while True:
            if look_ahead and pulled % self.grad_accum == 0:  # a read at a step boundary may be one ahead
                self._before = copy.deepcopy(self._holder.state_dict())
            item = next(source, _END)
            if item is _END:
                self._exhausted = True
                return
            pulled += 1
            yield item

    def next_step(self) -> list[Any]:
        micro = super().next_step()
        if self.end_of_epoch and not self._exhausted and self._source is not None:
            if next(self._source, _END) is _END:  # run the epoch's iterator to its end (it yields no more)
                self._exhausted = True
        return micro

    def _consumed_state(self) -> Any:
        if self._it is None:  # not iterated since it was built or loaded
            return self._loaded
        if self.steps_per_epoch is None and not self._exhausted and self._before is not _END:
            return self._before  # one micro-batch was read ahead: the state from before that read
        return copy.deepcopy(self._holder.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "iterable": self._consumed_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._loaded = state.get("iterable")
        self._source = None

    def close(self) -> None:
        if self._it is not None:  # a later fit() goes on from here (the loader's workers end now)
            self._loaded, self._source = self._consumed_state(), None
        super().close()


class ReplayStream(StepStream):
    """Steps from an iterable without state: a resume iterates past what was consumed, saying so once."""

    def __init__(self, iterable: Iterable, grad_accum: int, name: str,
                 on_close: Callable[[], None] | None = None, on_epoch: Callable[[int], None] | None = None) -> None:
        self.name, self._kind = name, type(iterable).__name__
        self._warned = False

        def epoch_iter(epoch: int, start: int) -> Iterator[Any]:
            if on_epoch is not None:
                on_epoch(epoch)
            return iter(iterable)

        super().__init__(epoch_iter, grad_accum, _steps(iterable, grad_accum), exact_position=False,
                         on_close=on_close)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.position > 0 and not self.end_of_epoch and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.name} ({self._kind}) has no state_dict()/load_state_dict(): resuming iterates over the "
                f"{self.position * self.grad_accum} batches of epoch {self.epoch} already trained on and skips "
                "them, which is exact only if it yields the same batches again. Give it state_dict() and "
                "load_state_dict() (or use torchdata's StatefulDataLoader) to resume without replaying.",
                stacklevel=2)


def stream_iterable(data: Iterable, name: str, batch_size: int, grad_accum: int, collate_fn: Callable | None,
                    num_workers: int, pin_memory: bool, drop_last: bool, seed: int = 0) -> StepStream:
    """The step stream of an iterable ``data`` (see the module's docstring for the rules)."""
    holder, on_close = data, None
    # A private generator, seeded per epoch, gives the workers their base seed: drawing it from the global
    # RNG would shift the model's random stream (dropout) between a resumed and an uninterrupted run.
    generator = torch.Generator()
    set_epoch = getattr(data, "set_epoch", None)  # e.g. a Hugging Face IterableDataset: its shuffle, its state

    def on_epoch(epoch: int) -> None:
        generator.manual_seed(seed * 100_003 + epoch)
        if callable(set_epoch):
            set_epoch(epoch)

    if isinstance(data, IterableDataset):
        kw = dict(batch_size=batch_size, collate_fn=collate_fn or default_collate, num_workers=num_workers,
                  pin_memory=pin_memory, drop_last=drop_last, generator=generator)
        if has_state(data) and num_workers > 0:  # the state lives in the workers: a stateful loader reads it
            data = holder = _stateful_loader(data, name, kw)
        else:
            data = DataLoader(data, persistent_workers=num_workers > 0, **kw)
        on_close = _shut_down(data) if num_workers > 0 else None
    if has_state(holder):
        return StatefulStream(data, holder, grad_accum, on_close, on_epoch)
    return ReplayStream(data, grad_accum, name, on_close, on_epoch)


def _shut_down(loader: Any) -> Callable[[], None]:
    """Ends the worker processes of a loader cadence made, when ``fit()`` ends (not when it is collected)."""

    def shut_down() -> None:
        workers = getattr(loader, "_iterator", None)
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
            loader._iterator = None

    return shut_down


def _stateful_loader(data: IterableDataset, name: str, kw: dict[str, Any]) -> Any:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        raise bad("num_workers", kw["num_workers"], f"{name} ({type(data).__name__}) keeps its state in each "
                  "worker process, which only torchdata's StatefulDataLoader reads back; pip install torchdata, "
                  "or use num_workers=0.") from None
    return StatefulDataLoader(data, **kw)
