"""Nested state (dicts, lists and tuples of tensors, numbers, strings, booleans and None) as JSON plus tensors.

A callback, a model's ``get_extra_state()`` or a dataset may keep state that holds tensors (an LSTM's hidden
state). :func:`split` puts every tensor in a flat ``{path: tensor}`` dict, to be written as safetensors, and
leaves ``{"__tensor__": path}`` in its place in the JSON; :func:`join` puts them back. Anything else (an
object, a set, a dict with non-string keys) is refused with the path where it was found, so a checkpoint
never silently loses or pickles state.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

TENSOR = "__tensor__"
TUPLE = "__tuple__"


def split(state: Any, where: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json_value, tensors)``; ``where`` names the state's owner in errors and prefixes the tensor paths."""
    tensors: dict[str, torch.Tensor] = {}
    return _split(state, where, tensors), tensors


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach()
        return {TENSOR: path}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{path}: the state has the key {bad_keys[0]!r} of type {type(bad_keys[0]).__name__}; "
                              "a checkpoint stores dicts with string keys only: use str keys.")
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    raise ConfigError(f"{path}: the state holds a {type(value).__name__}; a checkpoint stores nested dicts and "
                      "lists of tensors, numbers, strings, booleans and None (nothing is pickled): convert it to "
                      "one of those in state_dict() and back in load_state_dict().")


def join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state :func:`split` took apart, with its tensors (on the CPU) put back."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        if set(value) == {TUPLE}:
            return tuple(join(v, tensors) for v in value[TUPLE])
        return {k: join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join(v, tensors) for v in value]
    return value

