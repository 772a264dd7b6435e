"""Validation: weighted means of the loss, the parts and the metrics over a set of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import killpoints
from .data.loading import batch_size_of
from .errors import bad
from .outputs import Forward, call_model, read_output
from .precision import Precision


class ValidationStopped(Exception):
    """A stop signal arrived during validation: the pass ended early and its partial sums are discarded."""


def stop_check(signals: Any, strategy: Any) -> tuple[Any, Any, bool]:
    """``(stop, agree, each_batch)`` for :func:`evaluate`: only during ``fit()`` (a test pass after a stopped
    fit runs whole). Where every forward is collective (FSDP), the ranks agree after every batch, so that all
    of them stop at the same one."""
    if not signals.active:
        return None, None, False
    return signals, strategy.max_values, strategy.collective_forward


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], precision: Precision, move: Callable[[Any], Any],
             forward: Forward | None, metric_fns: Mapping[str, Callable[[Any, Any], Any]],
             inputs: Sequence[str] | None = None,
             loss_weights: Mapping[str, float] | None = None,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             forward_kwargs: Mapping[str, Any] | None = None,
             part_names: Sequence[str] | None = None,
             stop: Any = None, agree: Callable[[list[float]], list[float]] | None = None,
             agree_each_batch: bool = False, loss_index: int | None = None) -> dict[str, float]:
    """Means weighted by batch size (or ``num_items``), in eval mode; the model's mode is restored after.

    ``forward_kwargs`` are added to every model call (the Trainer's ``val_forward_kwargs``); ``part_names``
    names the entries of a ``(loss, (part, ...))`` tuple, ``loss_index`` the loss's entry of a returned tuple.

    Sums stay on the device and are read once at the end; with ``all_reduce`` (each rank validating its
    share) they are summed over the ranks first.

    ``stop`` (the fit's :class:`~cadence.signals.StopSignals`) is looked at after each batch: once a stop signal
    has arrived the pass ends there and :class:`ValidationStopped` is raised, so a long validation never
    outlasts a scheduler's grace period. With several processes ``agree`` (the strategy's ``max_values``)
    makes every rank, at the end of its own pass, discard the validation if any rank stopped; with
    ``agree_each_batch`` (FSDP, where each forward needs every rank) they agree after every batch instead.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    total: Any = 0
    try:
        for batch in batches:
            batch = move(batch)
            with precision.autocast():
                raw = call_model(model, batch, forward, inputs, forward_kwargs)
            out = read_output(raw, training=False, loss_weights=loss_weights, part_names=part_names,
                              loss_index=loss_index)
            if out.num_items is not None:
                weight, loss = out.num_items, out.loss  # already a sum over num_items
            else:
                weight = batch_size_of(batch)
                loss = out.loss * weight
            values = {"loss": loss.detach().float()}
            values.update({k: v.float() * weight for k, v in out.parts.items()})
            for name, fn in metric_fns.items():
                values[name] = torch.as_tensor(fn(raw, batch)).float().reshape(()) * weight
            for k, v in values.items():
                sums[k] = v if k not in sums else sums[k] + v
            total = total + weight
            if killpoints.ACTIVE:
                killpoints.reached("val.batch")
            if stop is not None and agree_each_batch and agree is not None:
                if agree([float(stop.received is not None)])[0] > 0:  # a tiny collective per batch
                    break
            elif stop is not None and stop.received is not None:  # a Python attribute check per batch
                break
    finally:
        model.train(was_training)
    stopped = stop is not None and stop.received is not None
    if agree is not None and stop is not None:
        stopped = agree([float(stopped)])[0] > 0  # one tiny collective per pass: every rank takes one branch
    if stopped:
        raise ValidationStopped("a stop signal arrived during validation; the partial validation is discarded")
    if not sums:
        raise bad("val_data", "no batches", "validation yielded nothing; the validation data is empty.")
    names = [*sums, "__total__"]
    stacked = torch.stack([v.float().reshape(()) for v in sums.values()]
                          + [torch.as_tensor(total, dtype=torch.float32, device=next(iter(sums.values())).device)])
    if all_reduce is not None:
        stacked = all_reduce(stacked)
    read = dict(zip(names, stacked.tolist()))
    n = read.pop("__total__")
    return {k: v / n for k, v in read.items()}
