"""State that lives across steps outside the weights: a model's ``get_extra_state()`` and the
``state_dict()`` of callbacks and datasets, all saved in every checkpoint and restored on resume.

A model that carries state between batches (an LSTM's hidden state in truncated backprop through time) keeps
it in a module that overrides ``torch.nn.Module.get_extra_state`` / ``set_extra_state`` (PyTorch's own hook
for non-parameter state); cadence saves that state in the checkpoint's ``trainer.json`` (tensors in
``state.safetensors``), never in the weights files.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .weights import EXTRA_STATE as EXTRA
from .weights import strip_compiled


def has_state(obj: Any) -> bool:
    """Whether ``obj`` (a callback or a dataset) provides ``state_dict`` and ``load_state_dict``."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _extra_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(strip_compiled(name), m)
            for name, m in model.named_modules()
            if type(m).get_extra_state is not nn.Module.get_extra_state]


def model_extra_state(model: nn.Module) -> dict[str, Any]:
    """``{"<module path>._extra_state": module.get_extra_state()}`` for every module that overrides it (the
    keys ``model.state_dict()`` gives them)."""
    return {f"{name}.{EXTRA}" if name else EXTRA: m.get_extra_state() for name, m in _extra_modules(model)}


def stateful_datasets(train_data: Any) -> dict[str, Any]:
    """The map-style training datasets (one, or each of several sources) that provide ``state_dict()``; an
    iterable with state is checkpointed as the data position instead (data/loading.py)."""
    from collections.abc import Mapping

    from .data.loading import is_map_style

    sources = train_data if isinstance(train_data, Mapping) else {"train_data": train_data}
    return {str(name): d for name, d in sources.items()
            if has_state(d) and is_map_style(d) and not isinstance(d, nn.Module)}
