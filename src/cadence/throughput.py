"""Throughput beyond ``samples_per_s``: tokens per second and the model FLOPs utilization (MFU) of each log point.

Both come from the host alone, so the loop stays free of host-device syncs between log points: the tokens of a
step are read from its batches' shapes, and the FLOPs of an item are given (``flops_per_item``) or counted once,
by ``torch.utils.flop_counter.FlopCounterMode`` around the first step that ``fit()`` takes (the counter only
watches the operators run: the step's numbers are the same).

- tokens: ``tokens_per_item`` when given; else, when the items are token sequences (the batch's first field, or
  its ``"input_ids"``, is an ``int64``/``int32`` tensor of shape ``(batch, length)``), ``batch * length`` of
  every micro-batch; else none (``tokens_per_item=0`` never counts).
- MFU: ``flops_per_item * samples_per_s / peak_flops``: the training FLOPs (forward and backward) of one item,
  at the measured rate, over the device's peak FLOPs per second (both per process).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from .data.loading import batch_size_of
from .errors import bad

TOKEN_DTYPES = (torch.int64, torch.int32)
NOTHING = nullcontext()  # reused: no context object per step


def check_throughput(tokens_per_item: Any, flops_per_item: Any, peak_flops: Any) -> None:
    """The three arguments: counts >= 0 (or None), ``flops_per_item`` also ``"count"``, ``peak_flops`` > 0."""
    if tokens_per_item is not None and (isinstance(tokens_per_item, bool) or not isinstance(tokens_per_item, int)
                                        or tokens_per_item < 0):
        raise bad("tokens_per_item", tokens_per_item, "use the number of tokens in one item (0: count no tokens), "
                  "or None to count them when the items are token sequences.")
    if flops_per_item is not None and flops_per_item != "count" and (
            isinstance(flops_per_item, bool) or not isinstance(flops_per_item, (int, float)) or flops_per_item <= 0):
        raise bad("flops_per_item", flops_per_item, 'use the training FLOPs (forward + backward) of one item, e.g. '
                  '6 * parameters * tokens_per_item for a transformer, or "count" to count them once with torch\'s '
                  "FlopCounterMode.")
    if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float))
                                   or peak_flops <= 0):
        raise bad("peak_flops", peak_flops, "use the device's peak FLOPs per second in the run's precision, e.g. "
                  "989e12 for an H100's dense bf16.")
    if peak_flops is not None and flops_per_item is None:
        raise bad("peak_flops", peak_flops, 'MFU also needs the FLOPs of one item: pass flops_per_item=... or "count".')


def token_field(batch: Any) -> torch.Tensor | None:
    """The token sequences of a batch: its first field (or ``"input_ids"``) when it is an integer tensor of shape
    ``(batch, length)``; else None."""
    if isinstance(batch, Mapping):
        first = batch.get("input_ids", next(iter(batch.values()), None))
    elif isinstance(batch, (list, tuple)):
        first = batch[0] if batch else None
    else:
        first = batch
    if isinstance(first, torch.Tensor) and first.dim() == 2 and first.dtype in TOKEN_DTYPES:
        return first
    return None


class Throughput:
    """Counts the tokens of each step and (``flops_per_item="count"``) the FLOPs of an item; gives the rates of a
    log point."""

    def __init__(self, tokens_per_item: int | None = None, flops_per_item: float | str | None = None,
                 peak_flops: float | None = None) -> None:
        self.tokens_per_item, self.peak_flops = tokens_per_item, peak_flops
        self.flops_per_item = None if flops_per_item == "count" else flops_per_item
        self._count = flops_per_item == "count"
        self._sequences: bool | None = None if tokens_per_item is None else False  # None: not yet looked at
        self.step_tokens: int | None = None  # the tokens of the step just measured (token sequences only)

    def measure(self, draws: Sequence[Any]) -> AbstractContextManager[None]:
        """Around one step: its tokens (from the shapes) and, the first time when asked, its FLOPs per item."""
        if self._sequences is not False:
            self.step_tokens = self._tokens(draws)
        return self._counting(draws) if self._count else NOTHING

    def _tokens(self, draws: Sequence[Any]) -> int | None:
        fields = [token_field(b) for draw in draws for b in draw.micro_batches]
        if self._sequences is None:  # the first step says whether the items are token sequences
            self._sequences = bool(fields) and all(f is not None for f in fields)
            if not self._sequences:
                return None
        return sum(f.numel() for f in fields if f is not None)

    @contextmanager
    def _counting(self, draws: Sequence[Any]) -> Iterator[None]:
        from torch.utils.flop_counter import FlopCounterMode

        with warnings.catch_warnings():  # torch.compile warns about the counter's module hooks
            warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
            with FlopCounterMode(display=False) as counter:
                yield
        items = sum(batch_size_of(b) for draw in draws for b in draw.micro_batches)
        self.flops_per_item, self._count = counter.get_total_flops() / max(items, 1), False

    def rates(self, samples: int, tokens: int | None, seconds: float) -> dict[str, float]:
        """``tokens_per_s`` (when tokens were counted) and ``mfu`` (with ``flops_per_item`` and ``peak_flops``)."""
        out = {}
        if self.tokens_per_item:
            tokens = self.tokens_per_item * samples
        if tokens is not None:
            out["tokens_per_s"] = tokens / seconds
        if self.flops_per_item is not None and self.peak_flops is not None:
            out["mfu"] = self.flops_per_item * samples / seconds / self.peak_flops
        return out
