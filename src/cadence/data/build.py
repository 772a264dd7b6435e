"""From what the user passed as ``train_data``/``val_data`` to the step stream and the validation data."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import bad
from .loading import InMemory, StepStream, as_in_memory, is_map_style, stream_in_memory, stream_loader, stream_map_style
from .order import DataOrder
from .sampling import balanced_weights
from .sources import Sources
from .split import split

SAMPLERS = (None, "random", "sequential", "balanced")


@dataclass
class DataSettings:
    batch_size: int
    grad_accum: int
    seed: int
    shuffle: bool = True
    drop_last: bool = False
    collate_fn: Callable | None = None
    num_workers: int = 0
    pin_memory: bool = False
    sampler: str | None = None
    balance_by: Callable[[Any], Hashable] | None = None
    world_size: int = 1
    rank: int = 0
    item_seeding: bool = True


@dataclass
class Prepared:
    stream: Sources
    val_data: Any
    length: int | dict[str, int] | None  # items per epoch (per source), for checking a resume


def is_multi_source(data: Any, mix: str | None) -> bool:
    """A dict of datasets is several sources; a dict of tensors is one in-memory dataset (unless ``mix``)."""
    if not isinstance(data, Mapping) or not data:
        return False
    return mix is not None or not all(isinstance(v, torch.Tensor) for v in data.values())


def prepare(train_data: Any, val_data: Any, s: DataSettings, *, valid_frac: float | None = None,
            split_by: Callable[[Any], Hashable] | None = None, split_seed: int = 0, mix: str | None = None,
            source_weights: Mapping[str, float] | None = None) -> Prepared:
    if s.sampler not in SAMPLERS:
        raise bad("sampler", s.sampler, 'use "random" (the default), "sequential" or "balanced".')
    if (s.sampler == "balanced") != (s.balance_by is not None):
        raise bad("balance_by" if s.balance_by is None else "sampler", s.balance_by or s.sampler,
                  'balanced sampling needs both sampler="balanced" and balance_by=callable(item) -> label.')
    if is_multi_source(train_data, mix):
        if valid_frac is not None:
            raise bad("valid_frac", valid_frac, "several training sources cannot be split; pass val_data.")
        streams, lengths = {}, {}
        for i, (name, data) in enumerate(train_data.items()):
            data = _checked(data, f"train_data[{name!r}]")
            # each source its own seed, so two sources of equal length are not visited in the same order
            streams[str(name)] = _stream(data, s, s.seed + 1_000_003 * i, f"train_data[{name!r}]")
            lengths[str(name)] = len(data) if is_map_style(data) else None
        return Prepared(Sources(streams, mix or "each", source_weights, s.seed), val_data, lengths)
    if mix is not None or source_weights is not None:
        raise bad("mix" if mix is not None else "source_weights", mix or source_weights,
                  "it applies to several training sources: pass train_data={'name': data, ...}.")
    data = _checked(train_data, "train_data")
    if valid_frac is not None:
        if not is_map_style(data) or isinstance(data, DataLoader):
            raise bad("valid_frac", valid_frac, f"{type(train_data).__name__} cannot be split by index; pass a "
                      "map-style dataset or tensors, or give val_data instead.")
        data, val_data = split(data, valid_frac, split_seed, split_by)
    length = len(data) if is_map_style(data) and not isinstance(data, DataLoader) else None
    return Prepared(Sources({None: _stream(data, s, s.seed, "train_data")}), val_data, length)


def _checked(data: Any, name: str) -> Any:
    mem = as_in_memory(data)
    data = mem if mem is not None else data
    if not isinstance(data, DataLoader) and is_map_style(data) and len(data) == 0:
        raise bad(name, f"{type(data).__name__} of length 0", "the training data is empty.")
    return data


def _stream(data: Any, s: DataSettings, seed: int, name: str) -> StepStream:
    if isinstance(data, DataLoader) or not is_map_style(data):
        if not isinstance(data, Iterable):
            raise bad(name, type(data).__name__, "pass tensors, a TensorDataset, a map-style Dataset, a "
                      "DataLoader or an iterable of batches.")
        if s.sampler == "balanced":
            raise bad("sampler", "balanced", f"{name} is a loader used as is; pass the dataset itself.")
        return stream_loader(data, s.grad_accum)
    weights = balanced_weights(data, s.balance_by) if s.sampler == "balanced" else None
    order = DataOrder(len(data), s.batch_size, s.grad_accum, s.world_size, s.rank, seed=seed,
                      shuffle=s.shuffle and s.sampler != "sequential", drop_last=s.drop_last, weights=weights)
    if order.steps_per_epoch == 0:
        raise bad("batch_size", s.batch_size, f"with drop_last=True, the {len(data)} items of {name} make no full "
                  f"step of {order.global_batch} (batch_size * grad_accum); lower batch_size or set "
                  "drop_last=False.")
    if isinstance(data, InMemory):
        return stream_in_memory(data, order)
    return stream_map_style(data, order, s.collate_fn, s.num_workers, s.pin_memory, s.item_seeding)
