"""Call the model on a batch, and read what it returns as ``(loss, parts, num_items)``.

Batches are routed by shape: a tuple or list is unpacked as positional arguments, a dict as keyword
arguments, a tensor is passed alone; ``forward(model, batch)`` overrides this, and ``kwargs`` (the
Trainer's ``forward_kwargs``) are added to every call. The model may return a scalar loss, ``(loss, parts)``
with ``parts`` a dict of scalars, a NamedTuple (named by its fields) or a plain tuple (named ``part0``,
``part1``, ... or by ``part_names``), or a dict with ``"loss"`` whose other scalar entries are parts. A dict
with ``"num_items"`` declares ``"loss"`` a sum over that many items. The parts of ``(loss, parts)`` may also be
one tensor (tf-bind's ``(loss, aux_loss)``: a 0-dim tensor is one part, a vector one part per element), and a
part that is a vector (meshgpt's commit loss, one per quantizer) is logged as its sum. With ``loss_index`` the
loss is that entry of a returned tuple (nanoGPT's ``(logits, loss)``: 1); the other scalar entries are parts.
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


def _scalar(name: str, value: Any, vectors: bool = False) -> torch.Tensor:
    """A part as a 0-dim tensor; with ``vectors``, a 1-dim part (one loss per quantizer...) as its sum."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if vectors and isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() > 1:
        value = value.sum()
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise bad(f"model output part {name!r}", shape,
                  "every part must be a scalar (a 0-dim tensor or a number), or in a (loss, parts) tuple a vector "
                  "(logged as its sum); reduce it, e.g. with .mean().")
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
    """``(loss, parts)`` with parts a dict, a NamedTuple, a plain tuple or list, or a 0-dim or 1-dim tensor."""
    return isinstance(out, (tuple, list)) and len(out) == 2 and (
        isinstance(out[1], (Mapping, tuple, list)) or (isinstance(out[1], torch.Tensor) and out[1].ndim <= 1))


def named_parts(parts: Any, part_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The parts of ``(loss, parts)`` by name: a dict as is; a tuple's entries named by ``part_names`` if given,
    else by a NamedTuple's fields, else ``part0``, ``part1``, ... A ``None`` entry of a tuple (a part the call
    did not compute, e.g. soundstorm's critic loss with ``only_train_generator``) is left out."""
    if isinstance(parts, Mapping):
        return dict(parts)
    if isinstance(parts, torch.Tensor):  # one part (0-dim) or one part per element (a vector)
        parts = [parts] if parts.ndim == 0 else list(parts.unbind())
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
                part_names: Sequence[str] | None = None, loss_index: int | None = None) -> Output:
    """Split a model's return value into loss, parts and the optional item count.

    With ``loss_weights``, the loss is the weighted sum of those parts (with their gradients); ``part_names``
    names the entries of a ``(loss, (part, ...))`` tuple; ``loss_index`` says which entry of a returned tuple is
    the loss (the others that are scalars become parts, named by ``part_names`` or ``part<i>``).
    """
    parts: dict[str, torch.Tensor] = {}
    num_items = None
    if loss_index is not None:
        out = loss_at(out, loss_index, part_names)
        part_names = None
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
        parts = {k: _scalar(k, v, vectors=True) for k, v in named_parts(out[1], part_names).items()}
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


def loss_at(out: Any, loss_index: int, part_names: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """``(loss, parts)`` from a tuple whose loss is entry ``loss_index``: the other entries that are scalars (or
    numbers) are parts, named by ``part_names`` (one name per other entry) or ``part<i>`` by position; the rest
    (logits, predictions) are left to ``metrics``."""
    if not isinstance(out, (tuple, list)) or not -len(out) <= loss_index < len(out):
        what = f"a {type(out).__name__}" + (f" of {len(out)} entries" if isinstance(out, (tuple, list)) else "")
        raise bad("loss_index", loss_index, f"the model returns {what}; loss_index picks the loss out of a "
                  "returned tuple, e.g. 1 for (logits, loss): give an index inside it, or drop loss_index.")
    index = loss_index % len(out)
    others = [i for i in range(len(out)) if i != index]
    if part_names is not None and len(part_names) != len(others):
        raise bad("part_names", list(part_names), f"with loss_index the model's other {len(others)} entries are "
                  "named: give one name per entry besides the loss.")
    names = list(part_names) if part_names is not None else [f"part{i}" for i in others]
    parts = {name: out[i] for name, i in zip(names, others)
             if isinstance(out[i], (int, float, torch.Tensor)) and not isinstance(out[i], bool)
             and (not isinstance(out[i], torch.Tensor) or out[i].numel() == 1)}
    return out[index], parts


def _weighted(out: Any, training: bool, loss_weights: Mapping[str, float],
              part_names: Sequence[str] | None = None) -> Output:
    if isinstance(out, Mapping):
        raw = {k: v for k, v in out.items() if k not in ("loss", "num_items")}
        num_items = out.get("num_items")
    elif _is_pair(out):
        raw, num_items = named_parts(out[1], part_names), None
        if "loss" in loss_weights:  # tf-bind's combine_losses(loss, aux_loss): the first entry weighted too
            raw = {"loss": out[0], **raw}
    else:
        raise bad("model output", type(out).__name__, "with loss_weights the model must return its parts: a dict "
                  "of named scalar losses, or (loss, parts).")
    missing = [k for k in loss_weights if k not in raw]
    if missing:
        raise bad("loss_weights", dict(loss_weights), f"the model never returns the parts {missing}; it returns "
                  f"{sorted(raw)}.")
    for name in loss_weights:
        if isinstance(raw[name], torch.Tensor) and raw[name].ndim == 1 and not isinstance(out, Mapping):
            raw[name] = raw[name].sum()  # a vector part counts as its sum, as it is logged
        if not isinstance(raw[name], torch.Tensor) or raw[name].ndim != 0:
            _scalar(name, raw[name])  # raises the standard message
    loss = sum(float(w) * raw[k] for k, w in loss_weights.items())
    if training and not loss.requires_grad:
        raise bad("model output loss", "a tensor with no grad", "the weighted parts are not connected to any "
                  "trainable parameter; return them undetached.")
    parts = (_parts(raw, (), training) if isinstance(out, Mapping)
             else {k: _scalar(k, v, vectors=True) for k, v in raw.items() if k != "loss"})
    return Output(loss, parts, num_items)
