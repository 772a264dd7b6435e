"""Trainer state to and from plain tensors and JSON: model, optimizer, RNG."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..weights import strip_compiled


# ------------------------------------------------------------------------------------------------ model
def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded (FSDP2 DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def load_local_shards(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy this rank's saved shards into the model's sharded parameters and buffers, in place."""
    own = {strip_compiled(k): v for k, v in model.state_dict().items()}
    wrong = sorted(set(own) ^ set(tensors)) + sorted(k for k in set(own) & set(tensors)
                                                      if local(own[k]).shape != tensors[k].shape)
    if wrong:
        raise ConfigError(f"resume={source!r}: this rank's shards do not fit the model ({', '.join(wrong[:10])}); "
                          "resume with the same model and the same number of processes.")
    with torch.no_grad():
        for key, value in own.items():
            local(value).copy_(tensors[key])


# ------------------------------------------------------------------------------------------------ optimizer
def optimizer_state(optimizer: torch.optim.Optimizer,
                    copy: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``state_dict()`` split into tensors (``state.<param>.<key>``) and JSON (groups, plain values).

    ``copy(name, tensor)``, when given, makes the host copy of each tensor (by default: ``.to("cpu")``).
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                name, value = f"state.{index}.{key}", local(value).detach()
                tensors[name] = copy(name, value) if copy is not None else value.to("cpu")
            else:
                plain.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                   meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    current = optimizer.param_groups
    groups = []
    for saved, live in zip(meta["param_groups"], current, strict=False):
        groups.append({k: (tuple(v) if isinstance(live.get(k), tuple) else v) for k, v in saved.items()})
    if len(groups) != len(current) or any(len(g["params"]) != len(c["params"]) for g, c in zip(groups, current)):
        raise ConfigError("resume: the checkpoint's optimizer has different parameter groups from this run's; "
                          "resume with the same model, optimizer and frozen parameters, or start a new run.")
    params = [p for g in current for p in g["params"]]
    for index, values in state.items():  # FSDP2: a saved shard becomes a DTensor laid out like its parameter
        p = params[index] if index < len(params) else None
        if p is not None and hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor

            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.shape == p.to_local().shape:
                    values[key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                     run_check=False, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------------ RNG
def _bytes(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())


def rng_state() -> dict[str, torch.Tensor]:
    """torch (CPU and every CUDA device), numpy and python RNG states as uint8 tensors; the few plain values
    (numpy's position, python's version) as a JSON string in ``meta``, also bytes."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = _bytes(np.asarray(keys, dtype=np.uint32))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = _bytes(np.asarray(internal, dtype=np.uint32))
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, gauss_next]}
    tensors["meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    return tensors


def set_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    meta = json.loads(bytes(tensors["meta"].numpy()).decode())
    torch.set_rng_state(tensors["torch"])
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, cached))
    version, gauss_next = meta["python"]
    internal = tuple(int(x) for x in tensors["python"].numpy().view(np.uint32))
    random.setstate((version, internal, gauss_next))
