"""Balanced sampling (tf-bind's ``balance_sampling_by_target``): every label equally likely per draw.

``balance_by`` is a callable of the item or a sequence of labels, one per item (see ``labels.py``). With
several sources, ``sampler`` and ``balance_by`` may be given per source as ``{"source": value}``; a source
left out of such a dict gets the default (``sampler=None``, no ``balance_by``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import bad
from .labels import LabelsOf, labels_of

SAMPLERS = (None, "random", "sequential", "balanced")


def balanced_weights(data: Any, balance_by: LabelsOf, where: str = "train_data") -> torch.Tensor:
    """Per-item weights ``1 / count(label)``, so each label carries the same total weight."""
    labels = labels_of(data, balance_by, "balance_by", where)
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)


def per_source(argument: str, value: Any, names: list[str]) -> dict[str, Any]:
    """``value`` for each source: a ``{"source": value}`` dict looked up (unknown names refused), else shared."""
    if not isinstance(value, Mapping):
        return {name: value for name in names}
    unknown = [k for k in value if k not in names]
    if unknown:
        raise bad(argument, dict(value), f"{unknown} are not sources; the sources are {names}.")
    return {name: value.get(name) for name in names}


def check_sampler(sampler: Any, balance_by: Any, source: str | None = None) -> None:
    """One source's ``sampler`` and ``balance_by`` go together: both for balanced sampling, or neither."""
    where = "" if source is None else f" (source {source!r})"
    if isinstance(sampler, Mapping) or isinstance(balance_by, Mapping):
        name, value = ("sampler", sampler) if isinstance(sampler, Mapping) else ("balance_by", balance_by)
        raise bad(name, dict(value), "a {'source': value} dict applies to several training sources: pass "
                  "train_data={'name': data, ...}, or give one value.")
    if sampler not in SAMPLERS:
        raise bad("sampler", sampler, f'use "random" (the default), "sequential" or "balanced"{where}.')
    if sampler == "balanced" and balance_by is None:
        raise bad("sampler", sampler, f"balanced sampling{where} needs balance_by too: a callable(item) -> label "
                  "or one label per item.")
    if sampler != "balanced" and balance_by is not None:
        shown = balance_by if callable(balance_by) else "a sequence of labels"
        raise bad("balance_by", shown, f"it is used by balanced sampling only{where}; set sampler='balanced' too.")
