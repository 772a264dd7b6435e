"""An exponential moving average of the weights, updated by ema-pytorch's rules (as meshgpt keeps it).

``EMA(beta=0.999, update_every=1, update_after=0, power=None, inv_gamma=1.0, min_value=0.0)`` is passed to
the Trainer (``ema=EMA(...)``); after each optimizer step ``step`` (1-based) the outer loop calls
``update(step)``. The averaged copy is ``ema.model``, usable for inference.

The rules are ema-pytorch 0.8's ``EMA.update``, step for step, so a migrated run keeps the seed's averaged
weights. ema-pytorch counts its updates from 0, so after optimizer step ``step`` its counter reads
``n = step - 1``:

- the first update (``step == 1``) copies the live weights;
- after that only updates with ``n % update_every == 0`` do anything: while ``n <= update_after`` they copy,
  after it they average, ``ema = decay * ema + (1 - decay) * live``;
- ``decay(step)`` is ``1 - (1 + e / inv_gamma) ** -power`` with ``e = max(0, step - update_after - 1)``,
  0 while ``e`` is 0, clamped to ``[min_value, beta]`` and computed in float32 as ema-pytorch does it.
  With ``power=None`` (cadence's default) it is ``beta`` itself once ``e > 0``.

Floating-point parameters and floating-point buffers (batch-norm statistics) are copied and averaged alike;
integer buffers (``num_batches_tracked``) keep the value they had at ``attach``, as in ema-pytorch. Each copy
or average is one ``torch._foreach_copy_``/``torch._foreach_lerp_`` call, no Python loop per tensor. Whether
a step updates depends only on ``step``, so the averaged weights are all the state a checkpoint needs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .errors import bad
from .weights import clean_state_dict, unwrap_compiled


class EMA:
    def __init__(self, beta: float = 0.999, update_every: int = 1, update_after: int = 0,
                 power: float | None = None, inv_gamma: float = 1.0, min_value: float = 0.0) -> None:
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
        if not isinstance(min_value, (int, float)) or not 0.0 <= min_value <= beta:
            raise bad("EMA min_value", min_value, f"use a decay floor in [0, beta={beta}], e.g. 0.0.")
        self.beta, self.update_every, self.update_after = float(beta), update_every, update_after
        self.power, self.inv_gamma, self.min_value = power, inv_gamma, float(min_value)
        self.model: nn.Module | None = None
        self._ema: list[torch.Tensor] = []
        self._live: list[torch.Tensor] = []

    def attach(self, model: nn.Module) -> None:
        """Make the averaged copy of ``model`` (called once by the Trainer)."""
        source = unwrap_compiled(model)
        self.model = copy.deepcopy(source).eval().requires_grad_(False)
        pairs = [*zip(self.model.parameters(), source.parameters()), *zip(self.model.buffers(), source.buffers())]
        pairs = [(e, p) for e, p in pairs if p.is_floating_point() or p.is_complex()]
        self._ema = [e.data for e, _ in pairs]
        self._live = [p.data for _, p in pairs]

    def decay(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (1-based), as ema-pytorch computes it."""
        e = max(0, step - self.update_after - 1)
        if e == 0:
            return 0.0
        if self.power is None:
            return self.beta
        warm = 1 - (1 + torch.tensor(float(e)) / self.inv_gamma) ** -self.power  # float32, as ema-pytorch
        return warm.clamp(min=self.min_value, max=self.beta).item()

    def action(self, step: int) -> str:
        """What the update after optimizer step ``step`` does: ``"copy"``, ``"average"`` or ``"skip"``."""
        n = step - 1  # ema-pytorch's update counter before this update
        if n <= 0:
            return "copy"
        if n % self.update_every != 0:
            return "skip"
        return "copy" if n <= self.update_after else "average"

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Copy or average the live weights after optimizer step ``step``, by :meth:`action`."""
        action = self.action(step)
        if action == "skip" or not self._ema:
            return
        if action == "copy":
            torch._foreach_copy_(self._ema, self._live)
        else:
            torch._foreach_lerp_(self._ema, self._live, 1.0 - self.decay(step))

    def state_tensors(self, copy: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        return clean_state_dict(self.model, copy)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)
