"""``mix="concat"``: the micro-batches of several sources joined into one batch, for one forward and backward.

Batches are joined field by field, the way ``default_collate`` built them: tensors are concatenated along
dim 0; tuples and lists of fields, and dicts (by key), are joined per field; a list of plain values (strings,
numbers: a collated text column) is concatenated as a list. The sources' batches must have the same structure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import bad


def join_batches(batches: Sequence[Any], names: Sequence[str]) -> Any:
    """One batch holding the rows of ``batches`` (one per source, named ``names``) in that order."""
    if len(batches) == 1:
        return batches[0]
    return _join(list(batches), names, "batch")


def _join(parts: list[Any], names: Sequence[str], where: str) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        _same(parts, torch.Tensor, names, where)
        if any(p.ndim == 0 for p in parts):
            raise bad("mix", "concat", f"{where} is a 0-dim tensor in the batches of {list(names)}, which has no "
                      "rows to join; give every field a first (batch) dimension, or use mix='each'.")
        shapes = [tuple(p.shape[1:]) for p in parts]
        if len(set(shapes)) > 1:
            raise bad("mix", "concat", f"{where} has rows of different shapes in the batches of {list(names)} "
                      f"({', '.join(f'{n}: {list(s)}' for n, s in zip(names, shapes))}); the rows joined must have "
                      "the same shape: pad them to one width (e.g. in collate_fn), or use mix='each'.")
        return torch.cat(parts)
    if isinstance(first, Mapping):
        _same(parts, Mapping, names, where)
        keys = list(first)
        if any(list(p) != keys for p in parts):
            raise bad("mix", "concat", f"the sources {list(names)} give {where} with different keys "
                      f"({[sorted(p) for p in parts]}); the batches joined must have the same fields.")
        return {k: _join([p[k] for p in parts], names, f"{where}[{k!r}]") for k in keys}
    if isinstance(first, (tuple, list)):
        _same(parts, (tuple, list), names, where)
        if not all(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for p in parts for v in p):
            return [v for p in parts for v in p]  # a column of plain values: the rows follow each other
        if any(len(p) != len(first) for p in parts):
            raise bad("mix", "concat", f"the sources {list(names)} give {where} with {[len(p) for p in parts]} "
                      "fields; the batches joined must have the same fields.")
        fields = [_join([p[i] for p in parts], names, f"{where}[{i}]") for i in range(len(first))]
        return type(first)(fields) if type(first) in (tuple, list) else type(first)(*fields)
    raise bad("mix", "concat", f"{where} is a {type(first).__name__} in the batches of {list(names)}; concat joins "
              "tensors, and tuples, lists and dicts of them; use mix='each' for other batches.")


def _same(parts: list[Any], kind: type | tuple[type, ...], names: Sequence[str], where: str) -> None:
    if not all(isinstance(p, kind) for p in parts):
        raise bad("mix", "concat", f"the sources {list(names)} give {where} of different types "
                  f"({[type(p).__name__ for p in parts]}); the batches joined must have the same structure.")
