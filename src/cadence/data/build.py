"""From what the user passed as ``train_data``/``val_data`` to the step stream and the validation data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import bad
from .hf import torch_format
from .labels import take_labels
from .loading import InMemory, StepStream, as_in_memory, is_map_style, stream_in_memory, stream_map_style
from .order import DataOrder
from .sampling import balanced_weights, check_sampler, per_source
from .sources import Sources
from .split import given_indices, split_indices, take
from .streaming import stream_iterable


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    batch_size: int
    grad_accum: int
    seed: int
    shuffle: bool = True
    drop_last: bool = False
    collate_fn: Callable | None = None
    num_workers: int = 0
    pin_memory: bool = False
    sampler: str | Mapping[str, str | None] | None = None
    balance_by: Any = None  # a callable(item) -> label, one label per item, or {"source": either}
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
            split_by: Any = None, split_seed: int = 0, mix: str | None = None,
            source_weights: Mapping[str, float] | None = None, split_mode: str | None = None,
            val_indices: Any = None) -> Prepared:
    if is_multi_source(train_data, mix):
        if valid_frac is not None or val_indices is not None:
            raise bad("valid_frac" if valid_frac is not None else "val_indices",
                      valid_frac if valid_frac is not None else val_indices,
                      "several training sources cannot be split; pass val_data.")
        names = [str(name) for name in train_data]
        samplers, balances = per_source("sampler", s.sampler, names), per_source("balance_by", s.balance_by, names)
        streams, lengths = {}, {}
        for i, (name, data) in enumerate(train_data.items()):
            data = _checked(data, f"train_data[{name!r}]")
            own = replace(s, sampler=samplers[str(name)], balance_by=balances[str(name)])
            check_sampler(own.sampler, own.balance_by, str(name))
            # each source its own seed, so two sources of equal length are not visited in the same order
            streams[str(name)] = _stream(data, own, s.seed + 1_000_003 * i, f"train_data[{name!r}]")
            lengths[str(name)] = len(data) if is_map_style(data) else None
        return Prepared(Sources(streams, mix or "each", source_weights, s.seed), val_data, lengths)
    if mix is not None or source_weights is not None:
        raise bad("mix" if mix is not None else "source_weights", mix or source_weights,
                  "it applies to several training sources: pass train_data={'name': data, ...}.")
    check_sampler(s.sampler, s.balance_by)
    data = _checked(train_data, "train_data")
    if valid_frac is not None or val_indices is not None:
        name, value = ("valid_frac", valid_frac) if valid_frac is not None else ("val_indices", val_indices)
        if not is_map_style(data) or isinstance(data, DataLoader):
            raise bad(name, value, f"{type(train_data).__name__} cannot be split by index; pass a "
                      "map-style dataset or tensors, or give val_data instead.")
        train_idx, val_idx = (given_indices(train_data, val_indices, len(data)) if val_indices is not None
                              else split_indices(data, valid_frac, split_seed, split_by, split_mode))
        # labels given one per item of train_data follow the items into the training side
        s = replace(s, balance_by=take_labels(s.balance_by, train_idx, len(data), "balance_by"))
        data, val_data = take(data, train_idx), take(data, val_idx)
    length = len(data) if is_map_style(data) and not isinstance(data, DataLoader) else None
    return Prepared(Sources({None: _stream(data, s, s.seed, "train_data")}), val_data, length)


def _checked(data: Any, name: str) -> Any:
    data = torch_format(data)
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
        return stream_iterable(data, name, s.batch_size, s.grad_accum, s.collate_fn, s.num_workers, s.pin_memory,
                               s.drop_last, seed)
    weights = balanced_weights(data, s.balance_by, name) if s.sampler == "balanced" else None
    order = DataOrder(len(data), s.batch_size, s.grad_accum, s.world_size, s.rank, seed=seed,
                      shuffle=s.shuffle and s.sampler != "sequential", drop_last=s.drop_last, weights=weights)
    if order.steps_per_epoch == 0:
        raise bad("batch_size", s.batch_size, f"with drop_last=True, the {len(data)} items of {name} make no full "
                  f"step of {order.global_batch} (batch_size * grad_accum); lower batch_size or set "
                  "drop_last=False.")
    if isinstance(data, InMemory):
        return stream_in_memory(data, order)
    return stream_map_style(data, order, s.collate_fn, s.num_workers, s.pin_memory, s.item_seeding)
