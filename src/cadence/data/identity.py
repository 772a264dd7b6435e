"""The arguments that decide which items train and in what order, in a form a checkpoint keeps (JSON), so that
a resume which changes one of them is refused by name (``checkpoint/snapshot.check_fits``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Besides the data's length, batch_size, grad_accum, the world size and seed (checked since checkpoints began).
ORDER_ARGUMENTS = ("valid_frac", "split_by", "split_seed", "split_mode", "shuffle", "drop_last", "item_seeding",
                   "sampler", "balance_by", "mix", "source_weights")


def described(value: Any) -> Any:
    """``value`` as JSON that changes when it does: numbers, strings and None as they are; a function by its
    dotted name; a list of labels by its length and a digest of its items."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): described(v) for k, v in value.items()}
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"function {getattr(value, '__module__', None) or '?'}.{name}"
    try:
        items = list(value)
    except TypeError:
        return repr(value)
    digest = hashlib.sha256(json.dumps([str(v) for v in items]).encode()).hexdigest()[:12]
    return f"{len(items)} labels, sha256 {digest}"


def order_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`ORDER_ARGUMENTS` of a ``Trainer``'s (checked) arguments, described; ``split_mode`` as resolved
    (None is "groups" with split_by, else "random")."""
    from .split import resolve_mode

    found = {name: described(arguments.get(name)) for name in ORDER_ARGUMENTS}
    if arguments.get("valid_frac") is not None:
        found["split_mode"] = resolve_mode(arguments.get("split_mode"), arguments.get("split_by"))
    return found
