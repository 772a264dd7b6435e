"""Where the run happens: choosing the device, moving batches there, seeding every RNG."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .errors import bad


def resolve_device(device: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``"auto"`` is cuda (``cuda:LOCAL_RANK`` under torchrun), then mps, then cpu; anything else must be
    available here."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad("device", device, 'use "auto", "cpu", "cuda", "cuda:N" or "mps".') from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise bad("device", device, 'no CUDA device is available here; use device="auto" or "cpu".')
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise bad("device", device, 'MPS is not available here; use device="auto" or "cpu".')
    return dev


def mover(device: torch.device) -> Callable[[Any], Any]:
    """A function that moves a batch (tensors, tuples, lists, dicts) to ``device`` without blocking."""
    if device.type == "cpu":
        return lambda batch: batch  # batches are made on the host: nothing to do, no per-step calls

    def move(batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {k: move(v) for k, v in batch.items()}
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*(move(v) for v in batch))
        if isinstance(batch, (tuple, list)):
            return type(batch)(move(v) for v in batch)
        return batch

    return move


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
