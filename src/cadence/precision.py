"""Numeric precision of the step: full fp32, bf16 autocast, or fp16 autocast with gradient scaling."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch

from .errors import bad

PRECISIONS = {"32": "32", "fp32": "32", "32-true": "32", "bf16": "bf16", "bf16-mixed": "bf16",
              "16": "16", "fp16": "16", "16-mixed": "16"}


_NOTHING = contextlib.nullcontext()  # reusable: it holds no state


class Precision:
    """``autocast()`` for forward passes and an optional ``scaler`` (fp16 only)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        name = PRECISIONS.get(str(precision))
        if name is None:
            raise bad("precision", precision, 'use "32" (fp32), "bf16" (bf16 autocast) or "16" '
                      "(fp16 autocast with gradient scaling).")
        if name == "16" and device.type != "cuda":
            raise bad("precision", precision, f'fp16 with gradient scaling needs a CUDA device, and this run is '
                      f'on {device.type!r}; use precision="bf16" (or "32"), or device="cuda".')
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise bad("precision", precision, 'this GPU has no bf16 support; use precision="16".')
        self.name = name
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if name == "16" else None
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(name)
        self._autocast: Callable[[], ContextManager] = (
            (lambda: _NOTHING) if dtype is None
            else lambda: torch.autocast(device_type=device.type, dtype=dtype))

    def autocast(self) -> ContextManager:
        return self._autocast()
