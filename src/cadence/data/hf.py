"""Hugging Face ``datasets``: a ``Dataset`` (or a streaming ``IterableDataset``) is used as it is, in the
``torch`` format when it has none, so that its numeric columns come as tensors and a batch is a dict of
columns, routed to the model as keyword arguments. ``datasets`` is never imported here: the check is by name.
"""

from __future__ import annotations

from typing import Any


def is_hf_dataset(data: Any) -> bool:
    """A ``datasets.Dataset`` or ``datasets.IterableDataset``."""
    return type(data).__module__.startswith("datasets.") and hasattr(data, "with_format")


def torch_format(data: Any) -> Any:
    """``data`` viewed in the ``torch`` format when it is a Hugging Face dataset with no format set (its items
    would otherwise be dicts of Python lists, which ``default_collate`` transposes); anything else as is."""
    if is_hf_dataset(data) and _format_type(data) is None:
        return data.with_format("torch")
    return data


def _format_type(data: Any) -> str | None:
    fmt = getattr(data, "format", None)  # Dataset: {"type": ..., "columns": ...}
    if isinstance(fmt, dict):
        return fmt.get("type")
    formatting = getattr(data, "_formatting", None)  # IterableDataset: a FormattingConfig, or None
    return getattr(formatting, "format_type", None)
