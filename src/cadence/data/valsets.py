"""Validation data given as several sources (``val_data={"name": data, ...}``): each measured on its own.

Each source's figures are logged as ``val/<source>/<name>`` (a record of split ``val/<source>``). A mean over
sets that hold different data means little, so none is logged unless asked for: with ``val_mean=True`` the plain
``val/<name>`` is also logged, their mean over the sources, each source counting once whatever its size (a macro
average: a small set of positives weighs as much as a large set of negatives), over the sources that report
that name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import bad
from .build import is_multi_source


def measure_sources(data: Any, measure: Callable[[Any], dict[str, float]], mean: bool = False
                    ) -> dict[str, dict[str, float]]:
    """``{"": measure(data)}``; for a dict of sources, ``{"<source>": its figures, ...}``, led by their mean under
    ``""`` when ``mean``."""
    if not is_multi_source(data, None):
        return {"": measure(data)}
    per_source = {str(name): measure(source) for name, source in data.items()}
    if not mean:
        return per_source
    names = list(dict.fromkeys(k for means in per_source.values() for k in means))
    averaged = {}
    for k in names:
        values = [means[k] for means in per_source.values() if k in means]
        averaged[k] = sum(values) / len(values)
    return {"": averaged, **per_source}


def check_watched(val_data: Any, val_mean: bool, watched: Sequence[tuple[str, str]]) -> None:
    """With several validation sets and no ``val_mean``, a watched name (``keep_best``, an early stopper's or the
    plateau's ``monitor``) must name one set's figure: ``val/loss`` would never be logged."""
    if val_mean or not is_multi_source(val_data, None):
        return
    sources = [str(name) for name in val_data]
    for arg, name in watched:
        split, _, rest = str(name).partition("/")
        if split in ("val", "val_ema") and rest and rest.split("/")[0] not in sources:
            raise bad(arg, name, f"with several validation sets ({', '.join(sources)}) each is logged on its own, "
                      f"as {split}/<set>/<name>, and their mean is not logged; watch one set's figure, e.g. "
                      f"'{split}/{sources[0]}/{rest}', or pass val_mean=True (--trainer.val_mean true) to also log "
                      f"their mean as {name!r}.")
