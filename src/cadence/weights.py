"""Model weights in and out of safetensors files, readable without cadence."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

COMPILED_PREFIX = "_orig_mod."


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state on the CPU, keys without ``torch.compile``'s ``_orig_mod.`` prefix.

    Tensors that share memory (tied weights) are each stored in full, so plain ``safetensors.load_file``
    gives back every key ``load_state_dict`` expects.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        key = key.replace(COMPILED_PREFIX, "")
        t = value.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous() or t.data_ptr() != ptr:
            t = t.contiguous().clone()
        else:
            seen.add(ptr)
        out[key] = t
    return out


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(clean_state_dict(model), str(path), metadata=metadata)
    return path
