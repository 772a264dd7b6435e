"""Collation for items of different lengths (MuLaN's wavs and texts): pad to the longest, or cut to the
shortest. Items are tensors, tuples of tensors or dicts of tensors; lengths vary along the first dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


def _pad(values: Sequence[torch.Tensor], value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors of different lengths (first dimension), padding with ``value``; and the mask of real
    positions. The mask is there even when the lengths happen to be equal, so every batch has one shape."""
    lengths = [v.shape[0] for v in values]
    longest = max(lengths)
    out = values[0].new_full((len(values), longest, *values[0].shape[1:]), value)
    mask = torch.zeros(len(values), longest, dtype=torch.bool)
    for i, v in enumerate(values):
        out[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    return out, mask


def pad_collate(batch: Sequence[Any], value: float = 0.0) -> Any:
    """Stack items, padding tensors that have a length (1+ dimensions) with ``value`` to the longest.

    A dict item gets ``<key>_mask`` (True on real positions) for each such key; a tuple item gets one mask
    appended, for its first such field; a tensor item becomes ``(padded, mask)``. Scalars and other fields
    are collated as PyTorch does by default.
    """
    first = batch[0]
    if isinstance(first, torch.Tensor):
        return _pad(batch, value)
    if isinstance(first, Mapping):
        out: dict[str, Any] = {}
        for key in first:
            column = [item[key] for item in batch]
            if isinstance(column[0], torch.Tensor) and column[0].ndim > 0:
                out[key], out[f"{key}_mask"] = _pad(column, value)
            else:
                out[key] = default_collate(column)
        return out
    fields, first_mask = [], None
    for column in zip(*batch):
        if isinstance(column[0], torch.Tensor) and column[0].ndim > 0:
            padded, mask = _pad(column, value)
            fields.append(padded)
            first_mask = first_mask if first_mask is not None else mask
        else:
            fields.append(default_collate(list(column)))
    return (*fields, first_mask) if first_mask is not None else tuple(fields)


class PadCollate:
    """:func:`pad_collate` with a pad value of one's own, as an object a YAML config can build:
    ``collate_fn: {class_path: cadence.data.PadCollate, init_args: {value: -1}}`` (meshgpt's pad id)."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def __call__(self, batch: Sequence[Any]) -> Any:
        return pad_collate(batch, self.value)

    def __repr__(self) -> str:
        return f"PadCollate(value={self.value!r})"


def curtail_collate(batch: Sequence[Any]) -> Any:
    """Stack items, cutting variable-length tensors to the shortest along the first dimension."""

    def cut(column: Sequence[Any]) -> Any:
        if isinstance(column[0], torch.Tensor) and column[0].ndim > 0:
            shortest = min(v.shape[0] for v in column)
            return torch.stack([v[:shortest] for v in column])
        return default_collate(list(column))

    first = batch[0]
    if isinstance(first, torch.Tensor):
        return cut(batch)
    if isinstance(first, Mapping):
        return {key: cut([item[key] for item in batch]) for key in first}
    return tuple(cut(column) for column in zip(*batch))
