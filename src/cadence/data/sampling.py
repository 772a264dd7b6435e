"""Balanced sampling (tf-bind's ``balance_sampling_by_target``): every label equally likely per draw."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..errors import bad


def balanced_weights(data: Any, balance_by: Callable[[Any], Hashable]) -> torch.Tensor:
    """Per-item weights ``1 / count(label)``, so each label carries the same total weight."""
    labels = []
    for i in range(len(data)):
        label = balance_by(data[i])
        if isinstance(label, torch.Tensor):  # a tensor hashes by identity: use its values
            label = label.item() if label.numel() == 1 else tuple(label.flatten().tolist())
        try:
            hash(label)
        except TypeError:
            raise bad("balance_by", balance_by, f"it returned {label!r} (type {type(label).__name__}) for item "
                      f"{i}, which is not hashable; return a str, an int or a tuple.") from None
        labels.append(label)
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)
