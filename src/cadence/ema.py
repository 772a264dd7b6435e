"""An exponential moving average of the weights (as meshgpt and most generative models keep).

``EMA(beta=0.999, update_every=1, update_after=0, power=None, inv_gamma=1.0)`` is passed to the Trainer
(``ema=EMA(...)``); after each optimizer step the outer loop calls ``update(step)``. The averaged copy is
``ema.model``, usable for inference. Parameters are blended with ``torch._foreach_lerp_`` (one fused call
per dtype/device group, no Python loop per tensor on the hot path); buffers are copied. With ``power``, the
decay warms up as ``1 - (1 + step / inv_gamma) ** -power``, capped at ``beta``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .errors import bad


class EMA:
    def __init__(self, beta: float = 0.999, update_every: int = 1, update_after: int = 0,
                 power: float | None = None, inv_gamma: float = 1.0) -> None:
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise bad("EMA beta", beta, "use a decay in [0, 1), e.g. 0.999 (closer to 1 averages longer).")
        if not isinstance(update_every, int) or update_every < 1:
            raise bad("EMA update_every", update_every, "use a positive number of steps, e.g. 1.")
        if not isinstance(update_after, int) or update_after < 0:
            raise bad("EMA update_after", update_after, "use 0 or a positive number of steps.")
        if power is not None and power <= 0:
            raise bad("EMA power", power, "use a positive warm-up power (e.g. 2/3), or None for a fixed beta.")
        if inv_gamma <= 0:
            raise bad("EMA inv_gamma", inv_gamma, "use a positive number, e.g. 1.0.")
        self.beta, self.update_every, self.update_after = float(beta), update_every, update_after
        self.power, self.inv_gamma = power, inv_gamma
        self.model: nn.Module | None = None
        self._ema: list[torch.Tensor] = []
        self._live: list[torch.Tensor] = []
        self._ema_buffers: list[torch.Tensor] = []
        self._live_buffers: list[torch.Tensor] = []

    def attach(self, model: nn.Module) -> None:
        """Make the averaged copy of ``model`` (called once by the Trainer)."""
        source = model._orig_mod if hasattr(model, "_orig_mod") else model
        self.model = copy.deepcopy(source).eval().requires_grad_(False)
        pairs = [(e, p) for e, p in zip(self.model.parameters(), source.parameters()) if p.is_floating_point()]
        self._ema = [e.data for e, _ in pairs]
        self._live = [p.data for _, p in pairs]
        self._ema_buffers = [b for b in self.model.buffers()]
        self._live_buffers = [b for b in source.buffers()]

    def decay(self, step: int) -> float:
        """The decay used for the update after optimizer step ``step`` (1-based)."""
        if self.power is None:
            return self.beta
        warm = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return min(max(warm, 0.0), self.beta)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend in the live weights after optimizer step ``step``; before ``update_after``, copy them."""
        if step <= self.update_after:
            torch._foreach_copy_(self._ema, self._live)
        elif step % self.update_every == 0:
            torch._foreach_lerp_(self._ema, self._live, 1.0 - self.decay(step))
        else:
            return
        if self._ema_buffers:
            torch._foreach_copy_(self._ema_buffers, self._live_buffers)

    def state_tensors(self, copy: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        from .weights import clean_state_dict

        return clean_state_dict(self.model, copy)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)
