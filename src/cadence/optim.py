"""Optimizers by name, with weight decay only where it belongs, and Lion.

By name, frozen parameters are left out and weight decay is applied only to tensors of two or more
dimensions (weight matrices, embeddings), never to biases and norm scales. On CUDA the fused kernels are
used; elsewhere PyTorch's own default implementation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatch
from typing import Any, Union

import torch
from torch import nn

from .errors import bad
from .weights import strip_compiled

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


def check_globs(model: nn.Module, globs: Iterable[str], argument: str) -> None:
    """Every glob must match at least one parameter name."""
    names = [strip_compiled(n) for n, _ in model.named_parameters()]
    for glob in globs:
        if not any(fnmatch(n, glob) for n in names):
            sample = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            raise bad(argument, glob, f"this glob matches no parameter; parameter names look like: {sample}.")


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters grouped by their options.

    Weight decay goes only to tensors of 2+ dimensions (not biases and norm scales) unless a glob in
    ``overrides`` (``{"encoder.*": {"lr": 1e-4}, "*.bias": {"weight_decay": 0.0}}``) says otherwise. Each group
    carries ``lr``, so an optimizer built by a callable starts at cadence's rate, not its own default. A
    parameter matched by two globs that set the same option to different values is an error.
    """
    overrides = dict(overrides or {})
    check_globs(model, overrides, "param_groups")
    grouped: dict[tuple, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            options = {"lr": lr, "weight_decay": weight_decay if p.ndim >= 2 else 0.0,
                       **options_for(strip_compiled(name), overrides)}
            grouped.setdefault(tuple(sorted(options.items())), []).append(p)
    return [{"params": params, **dict(key)} for key, params in grouped.items()]


def options_for(name: str, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The options the globs of ``overrides`` set for parameter ``name``; two globs that disagree are an error."""
    chosen: dict[str, tuple[str, Any]] = {}
    for glob, opts in overrides.items():
        if not fnmatch(name, glob):
            continue
        for key, value in opts.items():
            if key in chosen and chosen[key][1] != value:
                raise bad("param_groups", {chosen[key][0]: {key: chosen[key][1]}, glob: {key: value}},
                          f"both globs match {name!r} and set {key} differently; narrow one of them.")
            chosen[key] = (glob, value)
    return {k: v for k, (_, v) in chosen.items()}


def build_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float, weight_decay: float,
                    device: torch.device,
                    overrides: Mapping[str, Mapping[str, Any]] | None = None,
                    options: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """An optimizer from a name, a ``param_groups -> Optimizer`` callable, or an instance used as is.

    ``options`` (the Trainer's ``optimizer_options``) go to an optimizer chosen by name, e.g. ``betas``, ``eps``.
    """
    groups = param_groups(model, lr, weight_decay, overrides)
    if not groups:  # the one check of this rule: it runs for the first optimizer and again when a stage begins
        raise bad("model", type(model).__name__, "it has no trainable parameters (all have "
                  "requires_grad=False); unfreeze the parameters that should train.")
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if callable(spec):
        return spec(groups)
    name = str(spec).lower()
    if name not in CLASSES:
        raise bad("optimizer", spec, f"use one of {', '.join(OPTIMIZERS)}, a callable param_groups -> Optimizer, "
                  "or a torch.optim.Optimizer instance.")
    chosen = check_options(spec, options)
    # Adam's weight decay is L2 added to the gradient; AdamW's is decoupled. Lion has no fused kernel.
    fused = {"fused": True} if device.type == "cuda" and name != "lion" else {}
    if "fused" in chosen or "foreach" in chosen:
        fused = {}  # the user's choice of implementation
    try:
        return CLASSES[name](groups, lr=lr, **fused, **chosen)
    except (TypeError, ValueError) as err:
        raise bad("optimizer_options", dict(options or {}), f"{name} refused them ({err}); fix that value.") from err


CLASSES: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
                                                   "sgd": torch.optim.SGD, "lion": Lion}
_SET_BY_CADENCE = ("self", "params", "lr", "weight_decay")  # the Trainer's own arguments set these


def option_names(name: str) -> list[str]:
    """The options the optimizer called ``name`` takes besides the ones cadence sets (``lr``, ``weight_decay``)."""
    signature = inspect.signature(CLASSES[name].__init__)
    return [k for k, v in signature.parameters.items()
            if k not in _SET_BY_CADENCE and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]


def check_options(spec: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``optimizer_options`` checked against the optimizer's own options; YAML lists become tuples (``betas``)."""
    if not options:
        return {}
    if not isinstance(options, Mapping):
        raise bad("optimizer_options", options, "give a mapping of option names to values, e.g. "
                  "{betas: [0.9, 0.99], eps: 1e-8}.")
    if not isinstance(spec, str):
        raise bad("optimizer_options", dict(options), "they go to an optimizer chosen by name; give a callable "
                  "or class its options itself (e.g. init_args of a class_path), or name the optimizer.")
    name = spec.lower()
    if name not in CLASSES:
        return dict(options)  # build_optimizer names the bad optimizer
    valid = option_names(name)
    unknown = [k for k in options if k not in valid]
    if unknown:
        own = [k for k in unknown if k in _SET_BY_CADENCE]
        hint = f" ({', '.join(own)}: use the Trainer's own argument)" if own else ""
        raise bad("optimizer_options", dict(options), f"{name} has no option {', '.join(map(repr, unknown))}"
                  f"{hint}; its options are {', '.join(valid)}.")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Give ``new`` the state ``old`` had for the parameters both train (a stage change keeps their moments)."""
    if old is new:
        return
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]


def trained_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[torch.Tensor]:
    """The tensors ``optimizer`` trains in the model's order (as a hand-written
    ``clip_grad_norm_(model.parameters())`` sums the norms), then any it trains besides the model's."""
    trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    ids, in_model = {id(p) for p in trained}, {id(p) for p in model.parameters()}
    return [p for p in model.parameters() if id(p) in ids] + [p for p in trained if id(p) not in in_model]


def set_rates(optimizer: torch.optim.Optimizer, base_lrs: list[float], rate: float, peak: float) -> None:
    """The schedule's ``rate`` for each group: a group at cadence's ``lr`` (``peak``) gets it as it is; a group
    with its own starting rate gets that rate scaled alike."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = rate if base == peak else base * (rate / peak)
