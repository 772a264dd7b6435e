"""Model weights in and out of safetensors files, readable without cadence."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .errors import ConfigError

EXTRA_STATE = "_extra_state"  # the state_dict() key of a module's get_extra_state()


def is_extra_key(key: str) -> bool:
    return key == EXTRA_STATE or key.endswith(f".{EXTRA_STATE}")

COMPILED = "_orig_mod"  # where torch.compile keeps the model it wraps


def strip_compiled(name: str) -> str:
    """A parameter, buffer or module name as the model itself names it: every ``_orig_mod`` part that
    ``torch.compile`` adds (``_orig_mod.fc.weight``, the wrapper's own ``_orig_mod``) removed. The one place
    this rule is written."""
    return ".".join(part for part in name.split(".") if part != COMPILED)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wraps, or ``model`` itself when it is not compiled."""
    return getattr(model, COMPILED, model)


def clean_state_dict(model: nn.Module, copy: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """The model's state on the CPU, keys without ``torch.compile``'s ``_orig_mod.`` prefix.

    Tensors that share memory (tied weights) are each stored in full, so plain ``safetensors.load_file``
    gives back every key ``load_state_dict`` expects. ``copy(key, tensor)``, when given, makes the host copy
    of each tensor (by default CPU tensors are returned as they are, not copied).
    """
    state = {strip_compiled(k): v for k, v in model.state_dict().items()}
    # a module's get_extra_state() is checkpointed apart, never as a weight
    return host_tensors({k: v for k, v in state.items() if not is_extra_key(k)}, copy)


def host_tensors(tensors: dict[str, torch.Tensor], copy: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """CPU tensors that safetensors can write: ``copy(key, tensor)`` when given (staging buffers), else a move to
    the CPU (a CPU tensor is returned as it is); tensors sharing memory or not contiguous are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = copy(key, value.detach()) if copy is not None else value.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous() or t.data_ptr() != ptr:
            t = t.contiguous().clone()
        else:
            seen.add(ptr)
        out[key] = t
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file whole or not at all (temporary file, then rename), with the process's umask
    (``safetensors.save_file`` would leave it readable by its owner only)."""
    from .rundir import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, safetensors_bytes(tensors, metadata=metadata))
    return path


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    return write_safetensors(clean_state_dict(model), path, metadata)


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a foreign checkpoint: the object itself, or under a usual key."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "module", "ema_model", "ema"):
            if key in obj:
                try:
                    return _find_state_dict(obj[key])
                except ValueError:
                    continue
    raise ValueError("no mapping of parameter names to tensors found")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, or from a foreign ``.pt``/``.ckpt`` loaded with
    ``torch.load(weights_only=True)`` (which refuses to run code); ``module.`` and ``_orig_mod.`` prefixes are
    removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            tensors = _find_state_dict(obj)
        except Exception as err:
            raise ValueError(f"{path}: cannot read weights from it safely ({err}); cadence loads foreign "
                             "checkpoints with weights_only=True only, so convert it to a plain state_dict "
                             "of tensors first.") from None
    return {_strip(k): v for k, v in tensors.items()}


def _strip(key: str) -> str:
    key = strip_compiled(key)
    return key[len("module."):] if key.startswith("module.") else key


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load weights from a safetensors file or a foreign ``.pt``/``.ckpt`` (``weights_only=True``) into ``model``.

    Returns the model; with ``strict`` a mismatch raises an error listing the missing, unexpected and
    mis-shaped keys. A module's extra state (``get_extra_state()``, state that is not a weight) is not in the
    weights files cadence writes: when the file has none, the model keeps its own, so a model loads strictly
    from the file it wrote.
    """
    tensors = read_weights(path)
    if strict:
        load_model(model, tensors, str(path))
    else:
        model.load_state_dict(tensors, strict=False)
    return model


def load_model(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights with one clear error that lists every missing, unexpected and mis-shaped key. Extra state
    (``*._extra_state``) is loaded when ``tensors`` has it (a resume) and left as it is when not (a weights file)."""
    target = unwrap_compiled(model)
    own = {strip_compiled(k): v for k, v in target.state_dict().items()}
    missing = sorted(k for k in set(own) - set(tensors) if not is_extra_key(k))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(tensors) if isinstance(own[k], torch.Tensor)
                    and isinstance(tensors[k], torch.Tensor) and tensors[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        listing = "; ".join(f"{label}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("mis-shaped", shapes)) if keys)
        raise ConfigError(f"weights from {source!r} do not fit this model ({listing}); use the model they were "
                          "trained with (the same class and arguments), or start a new run.")
    # strict=False only lets extra state the file lacks stay as it is: every other key was checked above
    target.load_state_dict(dict(tensors), strict=not any(is_extra_key(k) and k not in tensors for k in own))
