"""``data`` and ``val_data`` on the command line: ``class_path`` + ``init_args`` merged as for ``model``.

jsonargparse keeps these two sections as plain mappings (a data source may be a class or a function that
returns tensors, which no base class describes), and a mapping is replaced whole, not merged: a dotted
``--data.init_args.n 3`` lost its ``init_args`` level and a second ``--config`` dropped the first one's
``class_path``. So before jsonargparse parses, :func:`merge_sections` walks the arguments in order, merges
every config file's section, ``--data {...}`` and ``--data.init_args.NAME VALUE`` (or the short form
``--data.NAME VALUE``) into one mapping per section, and passes it on as one ``--data`` argument at the end.
A new ``class_path`` starts from fresh ``init_args``; the same one keeps them and updates the names given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("data", "val_data", "test_data")
UNSET = object()


def _value(text: str) -> Any:
    """A command-line value as YAML reads it (``3`` is an int, ``[1, 2]`` a list, ``null`` None)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def normalize(spec: Any) -> Any:
    """``{class_path, init_args}``; any other key of the mapping is an init arg (the short form)."""
    if isinstance(spec, str):
        return {"class_path": spec, "init_args": {}}
    if not isinstance(spec, dict):
        return spec  # None, or a mistake the checks report with its key
    init = dict(spec.get("init_args") or {})
    init.update({k: v for k, v in spec.items() if k not in ("class_path", "init_args")})
    out = {"class_path": spec["class_path"]} if "class_path" in spec else {}
    out["init_args"] = init
    return out


def merge(current: Any, new: Any) -> Any:
    """``new`` over ``current``: the same (or no) class_path merges init_args, another one replaces them."""
    new = normalize(new)
    if not isinstance(new, dict) or not isinstance(current, dict):
        return new
    if "class_path" in new and new["class_path"] != current.get("class_path"):
        return new
    return {**current, "init_args": {**current.get("init_args", {}), **new["init_args"]}}


def _set(current: Any, dotted: str, value: Any) -> Any:
    """Apply ``--SECTION.<dotted> value``: ``class_path``, ``init_args``, ``init_args.NAME`` or ``NAME``."""
    head, _, rest = dotted.partition(".")
    if head == "class_path" and not rest:
        return merge(current, {"class_path": value})
    if head == "init_args" and not rest:
        return merge(current, {"init_args": value if isinstance(value, dict) else {}})
    name = rest if head == "init_args" else dotted
    patch: Any = value
    for part in reversed(name.split(".")[1:]):
        patch = {part: patch}
    return merge(current, {"init_args": {name.split(".")[0]: patch}})


def _config_sections(path: str) -> dict[str, Any]:
    """The data sections of a config file; an unreadable file is left to jsonargparse to report."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return {k: loaded[k] for k in SECTIONS if k in loaded} if isinstance(loaded, dict) else {}


def _option(arg: str) -> tuple[str, str | None]:
    """``--data.init_args.n=3`` -> (``data.init_args.n``, ``3``); ``--data`` -> (``data``, None)."""
    key, eq, value = arg[2:].partition("=")
    return key.replace("val-data", "val_data").replace("test-data", "test_data"), value if eq else None


def merge_sections(args: list[str]) -> list[str]:
    """``args`` (after ``fit``) with every data-section option folded into one ``--data``/``--val_data``."""
    state: dict[str, Any] = {s: UNSET for s in SECTIONS}
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, value = _option(arg) if arg.startswith("--") else ("", None)
        section, _, dotted = key.partition(".")
        if key == "config" or section not in SECTIONS:
            out.append(arg)
            if key == "config":
                path = value if value is not None else (args[i + 1] if i + 1 < len(args) else "")
                if value is None and i + 1 < len(args):
                    out.append(args[i + 1])
                    i += 1
                for name, spec in _config_sections(path).items():
                    state[name] = merge(None if state[name] is UNSET else state[name], spec)
            i += 1
            continue
        if value is None:
            if i + 1 >= len(args):
                out.append(arg)  # jsonargparse reports the missing value
                break
            value, i = args[i + 1], i + 1
        current = None if state[section] is UNSET else state[section]
        state[section] = _set(current, dotted, _value(value)) if dotted else merge(current, _value(value))
        i += 1
    for name in SECTIONS:
        if state[name] is not UNSET:
            # null first: jsonargparse would try to merge a class_path mapping into the config file's one
            out += [f"--{name}", "null", f"--{name}", json.dumps(state[name], default=str)]
    return out


def _names_function(path: str) -> bool:
    """Whether the dotted ``path`` imports as a function (given as it is, not as a class path)."""
    import importlib
    import inspect

    module, _, attr = path.rpartition(".")
    try:
        return inspect.isfunction(getattr(importlib.import_module(module), attr, None))
    except Exception:  # the class path check reports what is wrong with it
        return False


def _class_options(args: list[str]) -> list[str]:
    """``--model.class_path X`` as ``--model X`` (the form jsonargparse checks against nn.Module when there is
    no model yet), and ``--trainer.optimizer a.B`` as a class path, not an optimizer's name (a function
    ``param_groups -> Optimizer`` stays a dotted path)."""
    out = []
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key == "--model.class_path":
            arg = "--model" + eq + value
        elif key == "--trainer.optimizer" and "." in (value if eq else args[i + 1] if i + 1 < len(args) else ""):
            first = (value if eq else args[i + 1]).lstrip()
            if not first.startswith(("{", "[")) and not _names_function(first):
                arg = "--trainer.optimizer.class_path" + eq + value
        out.append(arg)
    return out


def prepare_fit_args(args: list[str]) -> list[str]:
    """The arguments after ``fit``, ready for jsonargparse: class paths as such, data sections merged."""
    return merge_sections(_class_options(args))
