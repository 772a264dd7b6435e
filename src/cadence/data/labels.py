"""One hashable label per item, for ``split_by`` and ``balance_by``: from a callable of the item, or given.

A callable is called on every item (``label(data[i])``); a sequence of labels is used as it is, one per item
in the dataset's order: a list, a tuple, a tensor, a numpy array or a pandas column (STEP's category lives in
``adata.obs``, not in the item), so nothing has to load every item up front. Tensor labels count by value,
not by identity.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

from ..errors import bad

LabelsOf = Callable[[Any], Hashable] | Sequence[Hashable]


def is_given_labels(by: Any) -> bool:
    """Whether ``by`` is a sequence of labels (not a callable of the item, not None)."""
    return by is not None and not callable(by)


def check_labels_spec(argument: str, by: Any) -> None:
    """Refuse what can be neither a callable of the item nor a sequence of labels."""
    if by is None or callable(by):
        return
    if isinstance(by, (str, bytes, Mapping)) or not hasattr(by, "__len__") or not hasattr(by, "__getitem__"):
        raise bad(argument, by, "give a callable(item) -> label, or a sequence of labels with one per item "
                  "(a list, a tensor, a numpy array or a pandas column).")


def as_label(value: Any) -> Hashable:
    """A tensor label by its values (a tensor hashes by identity), anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.flatten().tolist())
    return value


def labels_of(data: Any, by: LabelsOf, argument: str, where: str = "train_data") -> list[Hashable]:
    """One hashable label per item of ``data``: ``by(data[i])``, or the given sequence, checked for length."""
    n = len(data)
    if callable(by):
        raw = [by(data[i]) for i in range(n)]
    else:
        check_labels_spec(argument, by)
        raw = by.tolist() if hasattr(by, "tolist") else list(by)  # tensors, numpy arrays, pandas columns
        if len(raw) != n:
            raise bad(argument, f"a sequence of {len(raw)} labels", f"{where} has {n} items; give exactly one "
                      "label per item, in the dataset's order.")
    labels = [as_label(v) for v in raw]
    for i, label in enumerate(labels):
        try:
            hash(label)
        except TypeError:
            what = by if callable(by) else "a sequence of labels"
            raise bad(argument, what, f"the label of item {i} is {label!r} (type {type(label).__name__}), "
                      "which is not hashable; use a str, an int or a tuple.") from None
    return labels


def take_labels(by: Any, index: Sequence[int], n: int, argument: str, where: str = "train_data") -> Any:
    """Given labels for the items ``index`` of a dataset of ``n`` items (after a split); a callable unchanged."""
    if not is_given_labels(by):
        return by
    check_labels_spec(argument, by)
    if len(by) != n:
        raise bad(argument, f"a sequence of {len(by)} labels", f"{where} has {n} items; give exactly one label "
                  "per item of the data before the split, in the dataset's order.")
    raw = by.tolist() if hasattr(by, "tolist") else list(by)
    return [raw[i] for i in index]
