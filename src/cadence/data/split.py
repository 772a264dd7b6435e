"""Hold out validation data: a seeded fraction of the items, or of the groups (no group on both sides)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils.data import Subset

from ..errors import bad
from .loading import InMemory


def _take(data: Any, index: torch.Tensor) -> Any:
    if isinstance(data, InMemory):
        return data.subset(index)
    return Subset(data, index.tolist())


def split(data: Any, valid_frac: float, seed: int,
          split_by: Callable[[Any], Hashable] | None = None) -> tuple[Any, Any]:
    """``(train, val)`` with about ``valid_frac`` of the items (or of the groups) in ``val``.

    Items: ``n_val = round(N * valid_frac)`` items picked by ``torch.randperm(N)`` seeded with ``seed``.
    Groups: the distinct groups (in order of first appearance) are permuted the same way and the first
    ``round(n_groups * valid_frac)`` go to validation, whole.
    """
    if not 0.0 < valid_frac < 1.0:
        raise bad("valid_frac", valid_frac, "use a fraction strictly between 0 and 1, e.g. 0.1.")
    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    if split_by is None:
        n_val = round(n * valid_frac)
        if n_val == 0 or n_val == n:
            raise bad("valid_frac", valid_frac,
                      f"with {n} items this leaves {'no validation' if n_val == 0 else 'no training'} items; "
                      "choose a fraction that puts at least one item on each side.")
        perm = torch.randperm(n, generator=gen)
        return _take(data, perm[n_val:].sort().values), _take(data, perm[:n_val].sort().values)

    groups: dict[Hashable, list[int]] = {}
    for i in range(n):
        key = split_by(data[i])
        try:
            groups.setdefault(key, []).append(i)
        except TypeError:
            raise bad("split_by", split_by, f"it returned {key!r}, which is not hashable; return a str, "
                      "int or tuple naming the group.") from None
    keys = list(groups)
    n_val = round(len(keys) * valid_frac)
    if n_val == 0 or n_val == len(keys):
        raise bad("valid_frac", valid_frac,
                  f"split_by found {len(keys)} groups, so this fraction leaves one side with no group; "
                  "use more groups or a different fraction.")
    order = torch.randperm(len(keys), generator=gen)
    val_keys = {keys[j] for j in order[:n_val].numpy()}
    val = [i for k in keys if k in val_keys for i in groups[k]]
    train = [i for k in keys if k not in val_keys for i in groups[k]]
    return _take(data, torch.tensor(sorted(train))), _take(data, torch.tensor(sorted(val)))


