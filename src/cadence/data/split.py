"""Hold out validation data, seeded by ``split_seed``, in one of four ways (``split_mode``).

- ``"random"``: ``round(N * valid_frac)`` items, the first of ``torch.randperm(N)``; both sides in index order.
- ``"groups"``: whole groups (``split_by``) held out: the distinct groups, in order of first appearance, are
  permuted the same way and the first ``round(n_groups * valid_frac)`` go to validation.
- ``"stratified"``: ``valid_frac`` of every group (step-kit's ``category_random_split``): a group of ``m``
  items keeps ``int((1 - valid_frac) * m)`` for training and holds out the rest, picked by a ``randperm(m)``
  per group (groups in order of first appearance, one generator); both sides in index order.
- ``"torch"``: exactly ``torch.utils.data.random_split(data, [N - k, k], generator=torch.Generator()
  .manual_seed(split_seed))`` with ``k = N - int((1 - valid_frac) * N)``, the lengths the seeds pass (``train =
  int((1 - f) * N)``, ``valid = N - train``): the same index lists, in the same order, so a migrated run keeps
  the seed's validation set.

``val_indices`` gives the held-out items themselves (:func:`given_indices`), for a seed whose split no mode
reproduces: a list of indices, or a callable(data) -> indices (or -> a ``Subset``) that runs the seed's own
split.

``split_by`` is a callable of the item or a sequence of labels, one per item (``labels.py``). Without
``split_mode`` the mode is ``"groups"`` when ``split_by`` is given, else ``"random"`` (as before there was a
``split_mode``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch.utils.data import Subset

from ..errors import bad
from .labels import LabelsOf, labels_of
from .loading import InMemory

SPLIT_MODES = ("random", "groups", "stratified", "torch")
GROUPED = ("groups", "stratified")


def resolve_mode(split_mode: str | None, split_by: Any) -> str:
    """The mode to use: ``split_mode``, or by default ``"groups"`` with ``split_by`` and ``"random"`` without."""
    mode = split_mode if split_mode is not None else ("groups" if split_by is not None else "random")
    if mode not in SPLIT_MODES:
        raise bad("split_mode", split_mode, f"use one of {', '.join(SPLIT_MODES)}.")
    if mode in GROUPED and split_by is None:
        raise bad("split_mode", mode, "it splits by group; give split_by (a callable(item) -> group, or one "
                  "group label per item).")
    if mode not in GROUPED and split_by is not None:
        raise bad("split_mode", mode, 'it ignores groups; drop split_by, or use "groups" or "stratified".')
    return mode


def take(data: Any, index: Sequence[int]) -> Any:
    """The items ``index`` of ``data``, in that order."""
    if isinstance(data, InMemory):
        return data.subset(torch.as_tensor(index, dtype=torch.long))
    return Subset(data, list(index))


def split(data: Any, valid_frac: float, seed: int, split_by: LabelsOf | None = None,
          split_mode: str | None = None) -> tuple[Any, Any]:
    """``(train, val)`` by :func:`split_indices`."""
    train, val = split_indices(data, valid_frac, seed, split_by, split_mode)
    return take(data, train), take(data, val)


def check_valid_frac(valid_frac: float) -> None:
    """The one rule for ``valid_frac``'s range (the Trainer checks it early, :func:`split_indices` again)."""
    if not 0.0 < valid_frac < 1.0:
        raise bad("valid_frac", valid_frac, "use a fraction strictly between 0 and 1, e.g. 0.1.")


def split_indices(data: Any, valid_frac: float, seed: int, split_by: LabelsOf | None = None,
                  split_mode: str | None = None) -> tuple[list[int], list[int]]:
    """The training and validation indices of ``data`` (see the module's docstring for each mode)."""
    check_valid_frac(valid_frac)
    mode = resolve_mode(split_mode, split_by)
    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    if mode == "random":
        n_val = _checked_count(round(n * valid_frac), n, valid_frac, "items")
        perm = torch.randperm(n, generator=gen)
        return perm[n_val:].sort().values.tolist(), perm[:n_val].sort().values.tolist()
    if mode == "torch":
        k = _checked_count(n - int((1 - valid_frac) * n), n, valid_frac, "items")
        perm = torch.randperm(n, generator=gen).tolist()  # what random_split draws for lengths [n - k, k]
        return perm[:n - k], perm[n - k:]
    groups = _groups(labels_of(data, split_by, "split_by"))
    if mode == "groups":
        keys = list(groups)
        n_val = _checked_count(round(len(keys) * valid_frac), len(keys), valid_frac, "groups")
        order = torch.randperm(len(keys), generator=gen)
        val_keys = {keys[j] for j in order[:n_val].tolist()}
        val = [i for k in keys if k in val_keys for i in groups[k]]
        train = [i for k in keys if k not in val_keys for i in groups[k]]
        return sorted(train), sorted(val)
    val = []
    for members in groups.values():
        n_train = int((1 - valid_frac) * len(members))
        perm = torch.randperm(len(members), generator=gen).tolist()
        val += [members[j] for j in perm[n_train:]]
    held = set(val)
    _checked_count(len(val), n, valid_frac, "items")
    return [i for i in range(n) if i not in held], sorted(val)


def given_indices(data: Any, val_indices: Any, n: int | None = None) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices from ``val_indices``: a sequence of item indices, or a callable(data) returning
    them (or a ``Subset``, or a ``(train, val)`` pair of them); training keeps the other items, in index order.
    ``n``: the number of items (default ``len(data)``; the callable gets ``data`` as the user gave it)."""
    n = len(data) if n is None else n
    given = val_indices(data) if callable(val_indices) else val_indices
    if isinstance(given, tuple) and len(given) == 2 and all(hasattr(g, "indices") for g in given):
        given = given[1]  # random_split and its kind return (train, val)
    given = getattr(given, "indices", given)
    raw = given.tolist() if hasattr(given, "tolist") else given
    if not isinstance(raw, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise bad("val_indices", _short(val_indices, given), "give the indices of the items to hold out (a list of "
                  "ints), or a callable(data) returning them (or a Subset).")
    bad_ones = [i for i in raw if not 0 <= i < n]
    if bad_ones or len(set(raw)) != len(raw):
        what = f"index {bad_ones[0]} is outside 0..{n - 1}" if bad_ones else "an index appears twice"
        raise bad("val_indices", _short(val_indices, given), f"{what} (the training data has {n} items); give each "
                  "held-out item's index once.")
    if not raw or len(raw) == n:
        raise bad("val_indices", _short(val_indices, given), f"it holds out {len(raw)} of {n} items; leave at "
                  "least one item on each side.")
    held = set(raw)
    return [i for i in range(n) if i not in held], list(raw)


def _short(val_indices: Any, given: Any) -> str:
    text = getattr(val_indices, "__qualname__", None) or repr(given)
    return text if len(text) <= 80 else text[:77] + "..."


def _groups(labels: list[Hashable]) -> dict[Hashable, list[int]]:
    """The item indices of each group, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(labels):
        groups.setdefault(key, []).append(i)
    return groups


def _checked_count(n_val: int, total: int, valid_frac: float, what: str) -> int:
    if n_val == 0 or n_val == total:
        raise bad("valid_frac", valid_frac,
                  f"with {total} {what} this leaves {'no validation' if n_val == 0 else 'no training'} {what}; "
                  "choose a fraction that puts at least one on each side.")
    return n_val
