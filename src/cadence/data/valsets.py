"""Validation data given as several sources (``val_data={"name": data, ...}``): each measured on its own.

Each source's figures are logged as ``val/<source>/<name>``; the plain ``val/<name>`` is their mean over the
sources, each source counting once whatever its size (so a small set of positives weighs as much as a large
set of negatives), over the sources that report that name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .build import is_multi_source


def measure_sources(data: Any, measure: Callable[[Any], dict[str, float]]) -> dict[str, float]:
    """``measure(data)``; for a dict of sources, the mean over the sources and each source's own figures."""
    if not is_multi_source(data, None):
        return measure(data)
    per_source = {str(name): measure(source) for name, source in data.items()}
    names = list(dict.fromkeys(k for means in per_source.values() for k in means))
    out = {}
    for k in names:
        values = [means[k] for means in per_source.values() if k in means]
        out[k] = sum(values) / len(values)
    for name, means in per_source.items():
        out.update({f"{name}/{k}": v for k, v in means.items()})
    return out
