"""Optimizers by name, with weight decay only where it belongs, and Lion.

By name, frozen parameters are left out and weight decay is applied only to tensors of two or more
dimensions (weight matrices, embeddings), never to biases and norm scales. On CUDA the fused kernels are
used; elsewhere PyTorch's own default implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import nn

from .errors import bad

OPTIMIZERS = ("adamw", "adam", "sgd", "lion")

OptimizerSpec = Union[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer], torch.optim.Optimizer]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): the sign of an interpolated momentum, with decoupled weight decay.

    Update per parameter: ``u = sign(beta1 * m + (1 - beta1) * g)``; ``p -= lr * (u + wd * p)``;
    ``m = beta2 * m + (1 - beta2) * g``. Written with ``torch._foreach_*`` ops: one kernel per op per group.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise bad("betas", betas, "Lion's betas must each lie in [0, 1).")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            moms = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moms.append(state["exp_avg"])
            beta1, beta2 = group["betas"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            update = torch._foreach_lerp(moms, grads, 1.0 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_lerp_(moms, grads, 1.0 - beta2)
        return loss


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group (2+ dims) and an undecayed one (biases, norms).

    Each group carries ``lr``, so an optimizer built by a callable starts at cadence's rate, not its own default.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def build_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """An optimizer from a name, a ``param_groups -> Optimizer`` callable, or an instance used as is."""
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    groups = param_groups(model, lr, weight_decay)
    if not groups:
        raise bad("model", type(model).__name__,
                  "it has no trainable parameters (all have requires_grad=False); unfreeze some parameters.")
    if callable(spec):
        return spec(groups)
    name = str(spec).lower()
    fused = {"fused": True} if device.type == "cuda" else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    if name == "adam":
        # Adam's weight decay is L2 added to the gradient; AdamW's is decoupled.
        return torch.optim.Adam(groups, lr=lr, **fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **fused)
    if name == "lion":
        return Lion(groups, lr=lr)
    raise bad("optimizer", spec, f"use one of {', '.join(OPTIMIZERS)}, a callable param_groups -> Optimizer, "
              "or a torch.optim.Optimizer instance.")
