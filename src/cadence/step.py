"""The training step: one optimizer step over a list of micro-batches, read top to bottom.

Each micro-batch's loss is weighted by its share of the step's items, so ``grad_accum`` micro-batches give
the gradient of the mean over the whole step (a short last batch included). With several sources, each
source's mean loss is multiplied by its weight and the results are summed. When the model reports
``num_items``, its loss is a sum: the gradients are divided by the step's total items once all micro-batches
are in. Nothing here reads a device value (but the finite check on the CPU, where it costs no sync): the
returned loss and parts stay on the device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data.loading import batch_size_of
from .data.sources import Draw
from .outputs import Forward, call_model, read_output
from .precision import Precision

if TYPE_CHECKING:
    from .distributed import Strategy

_NOTHING = contextlib.nullcontext()  # reusable: it holds no state


@dataclass
class StepParts:
    """Everything the step touches, built by the trainer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    params: list[torch.Tensor]
    max_grad_norm: float | None
    forward: Forward | None
    move: Callable[[Any], Any]
    check_finite: bool = True  # read the loss on the host to skip a non-finite step
    inputs: Sequence[str] | None = None
    loss_weights: Mapping[str, float] | None = None
    strategy: Strategy | None = None  # how ranks agree: no_sync, all-reduce (None: a single process)
    forward_kwargs: Mapping[str, Any] | None = None  # keywords added to every model call
    part_names: Sequence[str] | None = None  # names of a (loss, (part, ...)) tuple's entries
    clip_per_group: bool = False  # clip each optimizer group to max_grad_norm on its own
    # compile="max": clip + optimizer step as one compiled function (compiling.py); None: the code below
    update: Callable[[StepParts], torch.Tensor | None] | None = None


def train_step(p: StepParts, draws: Sequence[Draw]) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                              torch.Tensor | None, int, bool]:
    """Forward, backward, clip and step; returns ``(loss, parts, grad_norm, samples, stepped)``.

    ``loss``, ``parts`` and ``grad_norm`` stay on the device; ``samples`` is the step's number of samples;
    ``stepped`` is False when a non-finite loss left the weights and the optimizer untouched.
    """
    scaler = p.precision.scaler
    loss_sum: Any = None
    parts_sum: dict[str, torch.Tensor] = {}
    item_total: Any = 0
    samples = 0
    counted = False  # True when the model reports num_items (a summed loss)

    world = p.strategy.world_size if p.strategy is not None else 1
    last = (len(draws) - 1, len(draws[-1].micro_batches) - 1)
    for d, (source, source_weight, micro_batches, total) in enumerate(draws):
        sizes = [batch_size_of(b) for b in micro_batches]
        source_samples = sum(sizes)
        samples += source_samples
        # items of this source's global batch; gradients are averaged over ranks, so a rank's share scales by world
        total = total if total is not None else source_samples * world
        prefix = f"{source}/" if source is not None else ""
        source_loss: Any = None
        for m, (batch, n) in enumerate(zip(micro_batches, sizes)):
            # all-reduce gradients once, after the last micro-batch
            hold = p.strategy is not None and (d, m) != last
            with p.strategy.no_sync(p.model) if hold else _NOTHING:
                with p.precision.autocast():
                    raw = call_model(p.model, p.move(batch), p.forward, p.inputs, p.forward_kwargs)
                    out = read_output(raw, training=True, loss_weights=p.loss_weights, part_names=p.part_names)
                if out.num_items is None:
                    share: Any = n * world / total  # this micro-batch's part of its source's mean
                    factor = share * source_weight
                else:
                    counted, share = True, out.num_items  # a sum: divided by the step's items below
                    item_total = item_total + share
                    factor = source_weight
                loss = out.loss if factor == 1 else out.loss * factor
                (scaler.scale(loss) if scaler is not None else loss).backward()

            loss = loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            whole = out.num_items is None and share == 1
            if prefix:
                mean = out.loss.detach() if whole else out.loss.detach() * share
                source_loss = mean if source_loss is None else source_loss + mean
            for name, value in out.parts.items():
                value = value if whole else value * share
                key = prefix + name
                parts_sum[key] = value if key not in parts_sum else parts_sum[key] + value
        if prefix and source_loss is not None:
            parts_sum[prefix + "loss"] = source_loss

    if counted:  # the losses were sums: turn the summed gradient into the gradient of the step's mean
        total_items = torch.as_tensor(item_total, dtype=torch.float32, device=loss_sum.device)
        if world > 1:  # every rank's items count; the gradients were averaged over ranks, undo that too
            total_items = p.strategy.all_reduce(total_items.clone()) / world
        grads = [q.grad for q in p.params if q.grad is not None]
        if grads:
            torch._foreach_div_(grads, total_items.to(grads[0].dtype))
        loss_sum = loss_sum / total_items
        parts_sum = {k: v / total_items for k, v in parts_sum.items()}

    # float() is a sync on an accelerator (check_finite is then off unless on_nonfinite="skip"), free on the CPU
    nonfinite = p.check_finite and not math.isfinite(float(loss_sum))
    if world > 1 and p.check_finite:
        nonfinite = p.strategy.any(nonfinite)  # every rank takes the same branch
    if nonfinite:
        p.optimizer.zero_grad(set_to_none=True)
        return loss_sum, parts_sum, None, samples, False

    if p.update is not None:  # the same clip and step, compiled (never with a grad scaler)
        grad_norm = p.update(p)
        p.optimizer.zero_grad(set_to_none=True)
        return loss_sum, parts_sum, grad_norm, samples, True
    if scaler is not None:
        scaler.unscale_(p.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = clip(p)
    if scaler is not None:
        scaler.step(p.optimizer)  # skipped when the gradients hold an inf or nan
        scaler.update()
    else:
        p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    return loss_sum, parts_sum, grad_norm, samples, True


def clip(p: StepParts) -> torch.Tensor | None:
    """Clip the gradients to ``max_grad_norm``; returns their norm before clipping (None when not clipping).

    With ``clip_per_group`` each optimizer param group is clipped on its own (as meshgpt's optimizer wrapper
    does); the returned norm is then the norm over all groups together (the norm of the groups' norms), the
    same value global clipping would report.
    """
    if p.max_grad_norm is None:
        return None
    if not p.clip_per_group:
        return _full(nn.utils.clip_grad_norm_(p.params, p.max_grad_norm))
    norms = []
    for group in p.optimizer.param_groups:
        if any(q.grad is not None for q in group["params"]):  # a group with no gradient has nothing to clip
            norms.append(_full(nn.utils.clip_grad_norm_(group["params"], p.max_grad_norm)))
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def _full(norm: torch.Tensor) -> torch.Tensor:
    """FSDP: the norm of sharded gradients is a DTensor; the whole value is what is logged."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
