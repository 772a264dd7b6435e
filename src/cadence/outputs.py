"""Call the model on a batch, and read what it returns as ``(loss, parts, num_items)``.

Batches are routed by shape: a tuple or list is unpacked as positional arguments, a dict as keyword
arguments, a tensor is passed alone; ``forward(model, batch)`` overrides this, and ``kwargs`` (the
Trainer's ``forward_kwargs``) are added to every call. The model may return a scalar loss, ``(loss, parts)``
with ``parts`` a dict of scalars, a NamedTuple (named by its fields) or a plain tuple (named ``part0``,
``part1``, ... or by ``part_names``), or a dict with ``"loss"`` whose other scalar entries are parts. A dict
with ``"num_items"`` declares ``"loss"`` a sum over that many items.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import bad

Forward = Callable[[nn.Module, Any], Any]


class Output(NamedTuple):
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    num_items: torch.Tensor | int | None


def call_model(model: nn.Module, batch: Any, forward: Forward | None, inputs: Sequence[str] | None = None,
               kwargs: Mapping[str, Any] | None = None) -> Any:
    """Run the model on ``batch``: ``forward`` if given, else routed by the batch's type.

    ``inputs`` names the fields of a tuple batch (or picks those of a dict batch) as keyword arguments;
    ``kwargs`` are added to every routed call (``forward_kwargs``: flags such as ``return_loss_breakdown``).
    """
    if forward is not None:
        return forward(model, batch)
    kwargs = kwargs or {}
    if inputs:
        return model(**_merged(name_fields(batch, inputs), kwargs))
    if isinstance(batch, (tuple, list)):
        return model(*batch, **kwargs)
    if isinstance(batch, Mapping):
        return model(**_merged(batch, kwargs))
    if isinstance(batch, torch.Tensor):
        return model(batch, **kwargs)
    raise bad("batch", type(batch).__name__,
              "cadence routes tuples/lists to model(*batch), dicts to model(**batch) and tensors to "
              "model(batch); for anything else pass forward=callable(model, batch) -> output.")


def _merged(fields: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The batch's keyword arguments plus ``forward_kwargs``; a name in both is an error, not a silent choice."""
    if not kwargs:
        return fields
    both = [k for k in kwargs if k in fields]
    if both:
        raise bad("forward_kwargs", dict(kwargs), f"the batch already holds the fields {both}; rename them or "
                  "leave them out of forward_kwargs.")
    return {**fields, **kwargs}


def name_fields(batch: Any, inputs: Sequence[str]) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        missing = [k for k in inputs if k not in batch]
        if missing:
            raise bad("inputs", tuple(inputs), f"the batch has no fields {missing}; its keys are {sorted(batch)}.")
        return {k: batch[k] for k in inputs}
    fields = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if len(inputs) > len(fields):
        raise bad("inputs", tuple(inputs), f"it names {len(inputs)} fields but the batch has {len(fields)}; "
                  "name at most as many fields as each batch holds.")
    return dict(zip(inputs, fields))


def _scalar(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise bad(f"model output part {name!r}", shape,
                  "every part must be a scalar (a 0-dim tensor or a number); reduce it, e.g. with .mean().")
    # a parameter or buffer, or a view of one, may change in place before the log point: keep this step's value
    shared = value.is_leaf or value._is_view()
    value = value.detach().reshape(())
    return value.clone() if shared else value


def _parts(out: Mapping[str, Any], skip: tuple[str, ...], training: bool) -> dict[str, torch.Tensor]:
    """The scalar entries of a dict output; in validation, other entries (predictions) are left to metrics.

    A Hugging Face ``ModelOutput`` (a dict with ``loss``, ``logits``, a cache, ...) gives only its scalar
    entries as parts, in training too: its other entries are predictions, never parts.
    """
    parts = {}
    model_output = is_model_output(out)
    for k, v in out.items():
        if k in skip:
            continue
        if model_output and not (isinstance(v, torch.Tensor) and v.numel() == 1):
            continue
        if not training and isinstance(v, torch.Tensor) and v.numel() != 1:
            continue
        parts[k] = _scalar(k, v)
    return parts


def is_model_output(out: Any) -> bool:
    """A ``transformers`` ``ModelOutput`` (checked by name: transformers need not be installed)."""
    return _model_output_type(type(out))


@functools.lru_cache(maxsize=64)
def _model_output_type(cls: type) -> bool:
    return any(c.__name__ == "ModelOutput" and c.__module__.startswith("transformers") for c in cls.__mro__)


def _is_pair(out: Any) -> bool:
    """``(loss, parts)`` with parts a dict, a NamedTuple, or a plain tuple or list."""
    return isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (Mapping, tuple, list))


def named_parts(parts: Any, part_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The parts of ``(loss, parts)`` by name: a dict as is; a tuple's entries named by ``part_names`` if given,
    else by a NamedTuple's fields, else ``part0``, ``part1``, ... A ``None`` entry of a tuple (a part the call
    did not compute, e.g. soundstorm's critic loss with ``only_train_generator``) is left out."""
    if isinstance(parts, Mapping):
        return dict(parts)
    if part_names is not None:
        if len(part_names) != len(parts):
            raise bad("part_names", list(part_names), f"the model returns {len(parts)} parts in its (loss, parts) "
                      f"tuple, not {len(part_names)}; give exactly one name per part.")
        names = list(part_names)
    elif hasattr(parts, "_fields"):
        names = list(parts._fields)
    else:
        names = [f"part{i}" for i in range(len(parts))]
    return {k: v for k, v in zip(names, parts) if v is not None}


def read_output(out: Any, training: bool, loss_weights: Mapping[str, float] | None = None,
                part_names: Sequence[str] | None = None) -> Output:
    """Split a model's return value into loss, parts and the optional item count.

    With ``loss_weights``, the loss is the weighted sum of those parts (with their gradients); ``part_names``
    names the entries of a ``(loss, (part, ...))`` tuple.
    """
    parts: dict[str, torch.Tensor] = {}
    num_items = None
    if part_names is not None and training and not (_is_pair(out) and not isinstance(out[1], Mapping)):
        returned = "a dict of named parts" if isinstance(out, Mapping) or _is_pair(out) else "no tuple of parts"
        raise bad("part_names", list(part_names), f"they name the entries of a (loss, (part, ...)) tuple, and the "
                  f"model returns {returned} ({type(out).__name__}); drop part_names.")
    if loss_weights:
        return _weighted(out, training, loss_weights, part_names)
    if isinstance(out, torch.Tensor):
        loss = out
    elif isinstance(out, Mapping):
        if "loss" not in out:
            raise bad("model output", f"dict with keys {sorted(out)}",
                      "a dict returned by the model must hold the total loss under 'loss'.")
        loss = out["loss"]
        num_items = out.get("num_items")
        parts = _parts(out, ("loss", "num_items"), training)
    elif _is_pair(out):
        loss = out[0]
        parts = {k: _scalar(k, v) for k, v in named_parts(out[1], part_names).items()}
    else:
        raise bad("model output", type(out).__name__, "return a scalar loss tensor, (loss, parts) with parts a "
                  "dict or a tuple of scalars, or a dict with a 'loss' entry.")
    if not isinstance(loss, torch.Tensor):
        raise bad("model output loss", type(loss).__name__, "the loss must be a tensor computed from the model.")
    if loss.ndim != 0:
        raise bad("model output loss", f"a tensor of shape {tuple(loss.shape)}",
                  "the loss must be a scalar; reduce it, e.g. loss.mean() (or return a sum with 'num_items').")
    if training and not loss.requires_grad:
        raise bad("model output loss", "a tensor with no grad",
                  "it is not connected to any trainable parameter; compute it from the model's outputs and "
                  "don't detach it or run under torch.no_grad().")
    return Output(loss, parts, num_items)


def _weighted(out: Any, training: bool, loss_weights: Mapping[str, float],
              part_names: Sequence[str] | None = None) -> Output:
    if isinstance(out, Mapping):
        raw = {k: v for k, v in out.items() if k not in ("loss", "num_items")}
        num_items = out.get("num_items")
    elif _is_pair(out):
        raw, num_items = named_parts(out[1], part_names), None
    else:
        raise bad("model output", type(out).__name__, "with loss_weights the model must return its parts: a dict "
                  "of named scalar losses, or (loss, parts).")
    missing = [k for k in loss_weights if k not in raw]
    if missing:
        raise bad("loss_weights", dict(loss_weights), f"the model never returns the parts {missing}; it returns "
                  f"{sorted(raw)}.")
    for name in loss_weights:
        if not isinstance(raw[name], torch.Tensor) or raw[name].ndim != 0:
            _scalar(name, raw[name])  # raises the standard message
    loss = sum(float(w) * raw[k] for k, w in loss_weights.items())
    if training and not loss.requires_grad:
        raise bad("model output loss", "a tensor with no grad", "the weighted parts are not connected to any "
                  "trainable parameter; return them undetached.")
    return Output(loss, _parts(raw, (), training), num_items)
