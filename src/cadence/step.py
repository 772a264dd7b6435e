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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import killpoints
from .data.loading import batch_size_of
from .data.sources import Draw
from .outputs import Forward, Output, call_model, read_output
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
    strategy: Strategy  # how ranks agree: no_sync, reductions (a single process: a null context, the identity)
    check_finite: bool = True  # read the loss on the host to skip a non-finite step
    inputs: Sequence[str] | None = None
    loss_weights: Mapping[str, float] | None = None
    forward_kwargs: Mapping[str, Any] | None = None  # keywords added to every model call
    part_names: Sequence[str] | None = None  # names of a (loss, (part, ...)) tuple's entries
    loss_index: int | None = None  # which entry of a returned tuple is the loss ((logits, loss): 1)
    clip_per_group: bool = False  # clip each optimizer group to max_grad_norm on its own
    # compile="max": clip + optimizer step as one compiled function (compiling.py); None: the code below
    update: Callable[[StepParts], torch.Tensor | None] | None = None


@dataclass
class StepResult:
    """What one step gives the loop; ``loss``, ``parts`` and ``grad_norm`` stay on the device."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None  # before clipping; None when not clipping or not stepped
    samples: int  # the step's samples on this process
    stepped: bool  # False when a non-finite loss left the weights and the optimizer untouched


def train_step(p: StepParts, draws: Sequence[Draw]) -> StepResult:
    """Forward and backward over every micro-batch, then clip and step the optimizer (skipped, weights and
    optimizer untouched, when the loss is not finite)."""
    sums = Sums()
    world = p.strategy.world_size
    last = (len(draws) - 1, len(draws[-1].micro_batches) - 1)
    for d, (source, source_weight, micro_batches, total) in enumerate(draws):
        sizes = [batch_size_of(b) for b in micro_batches]
        sums.samples += sum(sizes)
        # items of this source's global batch; gradients are averaged over ranks, so a rank's share scales by world
        total = total if total is not None else sum(sizes) * world
        prefix = f"{source}/" if source is not None else ""
        sums.source_loss = None
        for m, (batch, n) in enumerate(zip(micro_batches, sizes)):
            share = n * world / total  # this micro-batch's part of its source's mean
            with p.strategy.no_sync(p.model) if (d, m) != last else _NOTHING:  # all-reduce once, at the last
                out, loss = forward_backward(p, batch, share, source_weight)
            sums.add(out, loss, share, prefix)
        if prefix and sums.source_loss is not None:
            sums.parts[prefix + "loss"] = sums.source_loss

    if sums.counted:  # the losses were sums: turn the summed gradient into the gradient of the step's mean
        divide_by_items(p, sums)

    # float() is a sync on an accelerator (check_finite is then off unless on_nonfinite="skip"), free on the CPU
    nonfinite = p.check_finite and not math.isfinite(float(sums.loss))
    if p.check_finite:
        nonfinite = p.strategy.any(nonfinite)  # every rank takes the same branch
    if nonfinite:
        p.optimizer.zero_grad(set_to_none=True)
        return StepResult(sums.loss, sums.parts, None, sums.samples, stepped=False)

    # the same clip and step, compiled (never with a grad scaler), or eager
    grad_norm = p.update(p) if p.update is not None else clip_and_step(p)
    p.optimizer.zero_grad(set_to_none=True)
    return StepResult(sums.loss, sums.parts, grad_norm, sums.samples, stepped=True)


def forward_backward(p: StepParts, batch: Any, share: float, source_weight: float) -> tuple[Output, torch.Tensor]:
    """One micro-batch: forward under autocast, the loss weighted by its part of the step, backward.

    Returns the model's output and the loss as backpropagated (detached). A loss of a model that reports
    ``num_items`` is a sum: it is divided by the step's items once all micro-batches are in.
    """
    with p.precision.autocast():
        raw = call_model(p.model, p.move(batch), p.forward, p.inputs, p.forward_kwargs)
        out = read_output(raw, training=True, loss_weights=p.loss_weights, part_names=p.part_names,
                          loss_index=p.loss_index)
    if killpoints.ACTIVE:
        killpoints.reached("step.forward")
    factor = share * source_weight if out.num_items is None else source_weight
    loss = out.loss if factor == 1 else out.loss * factor
    scaler = p.precision.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if killpoints.ACTIVE:
        killpoints.reached("step.backward")
    return out, loss.detach()


@dataclass
class Sums:
    """The step's sums of the losses and parts, on the device."""

    loss: Any = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    source_loss: Any = None  # with several sources: the mean loss of the current one
    items: Any = 0  # the items of the micro-batches whose model reported num_items
    counted: bool = False  # True when the model reports num_items (a summed loss)
    samples: int = 0

    def add(self, out: Output, loss: torch.Tensor, share: Any, prefix: str) -> None:
        """One micro-batch's backpropagated ``loss``, and its parts weighted by ``share`` of the mean."""
        if out.num_items is not None:
            self.counted, share = True, out.num_items  # a sum: divided by the step's items
            self.items = self.items + share
        self.loss = loss if self.loss is None else self.loss + loss
        whole = out.num_items is None and share == 1
        if prefix:
            mean = out.loss.detach() if whole else out.loss.detach() * share
            self.source_loss = mean if self.source_loss is None else self.source_loss + mean
        for name, value in out.parts.items():
            value = value if whole else value * share
            key = prefix + name
            self.parts[key] = value if key not in self.parts else self.parts[key] + value


def divide_by_items(p: StepParts, sums: Sums) -> None:
    """Divide the summed gradients, loss and parts by the step's items (on every rank: their mean over the
    ranks, as the gradients were averaged over ranks)."""
    total_items = p.strategy.mean(torch.as_tensor(sums.items, dtype=torch.float32, device=sums.loss.device))
    grads = [q.grad for q in p.params if q.grad is not None]
    if grads:
        torch._foreach_div_(grads, total_items.to(grads[0].dtype))
    sums.loss = sums.loss / total_items
    sums.parts = {k: v / total_items for k, v in sums.parts.items()}


def clip_and_step(p: StepParts) -> torch.Tensor | None:
    """Unscale (with a grad scaler), clip and step the optimizer; returns the norm before clipping."""
    scaler = p.precision.scaler
    if scaler is not None:
        scaler.unscale_(p.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = clip(p)
    if scaler is not None:
        scaler.step(p.optimizer)  # skipped when the gradients hold an inf or nan
        scaler.update()
    else:
        p.optimizer.step()
    return grad_norm


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
