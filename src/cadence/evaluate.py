"""Validation: weighted means of the loss, the parts and the metrics over a set of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data.loading import batch_size_of
from .errors import bad
from .outputs import Forward, call_model, read_output
from .precision import Precision


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], precision: Precision, move: Callable[[Any], Any],
             forward: Forward | None, metric_fns: Mapping[str, Callable[[Any, Any], Any]],
             inputs: Sequence[str] | None = None,
             loss_weights: Mapping[str, float] | None = None,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Means weighted by batch size (or ``num_items``), in eval mode; the model's mode is restored after.

    Sums stay on the device and are read once at the end; with ``all_reduce`` (each rank validating its
    share) they are summed over the ranks first.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    total: Any = 0
    try:
        for batch in batches:
            batch = move(batch)
            with precision.autocast():
                raw = call_model(model, batch, forward, inputs)
            out = read_output(raw, training=False, loss_weights=loss_weights)
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
    finally:
        model.train(was_training)
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
