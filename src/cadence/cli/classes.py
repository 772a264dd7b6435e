"""Class paths (``model``, ``data``, ``val_data`` and the trainer's classes): import, check, build.

Every failure is one sentence that says what is wrong: the module's own ``SyntaxError`` or ``ImportError``
with its file and line, a module that is not there (and where it was looked for), "not an nn.Module",
"unknown argument X (the class takes: ...)", or the constructor's own error.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import traceback
from typing import Any

from ..errors import ConfigError

WHERE = "class paths are looked up in the working directory ({cwd}) and the installed packages"


def _where() -> str:
    return WHERE.format(cwd=os.getcwd())


def _raised_at(err: BaseException) -> str:
    """``file:line`` of the innermost frame of ``err``'s traceback (where it was raised)."""
    frames = traceback.extract_tb(err.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _module_error(key: str, path: str, module: str, err: BaseException) -> ConfigError:
    if isinstance(err, SyntaxError):
        return ConfigError(f"{key}.class_path={path!r}: {err.filename}, line {err.lineno}: SyntaxError: {err.msg}; "
                           "fix that line.")
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    if missing and (module == missing or module.startswith(missing + ".")):
        return ConfigError(f"{key}.class_path={path!r}: it does not import: there is no module {missing!r} "
                           f"({_where()}); give the full dotted path, e.g. cadence.demo.DigitsMLP, or install its "
                           "package.")
    return ConfigError(f"{key}.class_path={path!r}: importing {module} failed{_raised_at(err)}: "
                       f"{type(err).__name__}: {err}; fix the module or install what it needs.")


def import_class(path: Any, key: str) -> Any:
    """The object at the dotted ``path``; a :class:`ConfigError` with the real reason when it is not there."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ConfigError(f"{key}.class_path={path!r}: give the full dotted path module.Class, "
                          "e.g. cadence.demo.Digits.")
    module, _, attr = path.rpartition(".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:  # module.Class.method: the class's attribute
        owner = _class_attribute(module)
        if owner is None:
            raise _module_error(key, path, module, err) from None
        found = owner
    except Exception as err:  # SyntaxError, ImportError, or anything the module raised while importing
        raise _module_error(key, path, module, err) from None
    if not hasattr(found, attr):  # a module or (module.Class.method) a class
        names = sorted(n for n, v in vars(found).items()
                       if (inspect.isclass(v) or inspect.isfunction(v)) and not n.startswith("_"))
        close = difflib.get_close_matches(attr, names, n=1)
        hint = (f"did you mean {module}.{close[0]}?" if close else
                f"it defines: {', '.join(names)}." if 0 < len(names) <= 12 else "check the name.")
        raise ConfigError(f"{key}.class_path={path!r}: {module} ({getattr(found, '__file__', '?')}) has no "
                          f"{attr!r}; {hint}")
    return getattr(found, attr)


def _class_attribute(path: str) -> Any:
    """The class at ``path`` (``module.Class``) when ``path`` is no module, else None."""
    module, _, name = path.rpartition(".")
    try:
        owner = getattr(importlib.import_module(module), name, None) if module else None
    except Exception:
        return None
    return owner if inspect.isclass(owner) else None


def parameters(target: Any) -> tuple[list[str], list[str], bool]:
    """(all names, required names, takes **kwargs) of a class's constructor or a function."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return [], [], True
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    required = [p.name for p in params if p.default is p.empty]
    return names, required, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def takes(target: Any) -> str:
    names = parameters(target)[0]
    return f"the class takes: {', '.join(names)}" if names else "the class takes no arguments"


def check_init_args(target: Any, init_args: dict[str, Any], key: str, path: str) -> None:
    """Every name in ``init_args`` is a parameter of ``target`` and every required parameter is given."""
    names, required, open_ended = parameters(target)
    unknown = [n for n in init_args if n not in names]
    if unknown and not open_ended:
        raise ConfigError(f"{key}.init_args.{unknown[0]}: unknown argument {unknown[0]!r} of {path} "
                          f"({takes(target)}); fix the name.")
    missing = [n for n in required if n not in init_args]
    if missing:
        raise ConfigError(f"{key}.init_args: {path} needs {', '.join(missing)} ({takes(target)}); give "
                          f"--{key}.init_args.{missing[0]} VALUE or set it in the config.")


def untyped_required(target: Any) -> list[str]:
    """The required constructor arguments of ``target`` that carry no type hint."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.default is p.empty and p.annotation is p.empty]


def _fields(value: Any) -> dict[str, Any]:
    """A mapping's or a jsonargparse Namespace's own level (a Namespace's ``items()`` flattens the levels)."""
    if isinstance(value, dict):
        return value
    return dict(vars(value)) if type(value).__name__ == "Namespace" else {}


def check_given(value: Any, key: str) -> None:
    """Every required untyped argument of the classes in ``value`` (a parsed ``{class_path, init_args}``, or
    lists and mappings of them, nested) is given: jsonargparse fills a left-out one with None."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_given(v, f"{key}[{i}]")
        return
    if isinstance(value, dict) and "class_path" in value:  # jsonargparse left it as written: it did not validate
        _built(value, key)  # raises the reason (an import, a name, the constructor's own error)
        raise ConfigError(f"{key}={value!r}: the class does not accept these values; check each init_args entry "
                          "against its constructor.")
    as_dict = _fields(value)
    if "class_path" not in as_dict:
        for k, v in as_dict.items():
            check_given(v, f"{key}.{k}")
        return
    path = str(as_dict["class_path"])
    init = _fields(as_dict.get("init_args"))
    try:
        target = import_class(path, key)
    except ConfigError:
        return  # jsonargparse imported it when parsing; a class made on the fly has no import path
    missing = [n for n in untyped_required(target) if init.get(n) is None]
    if missing:
        raise ConfigError(f"{key}.init_args: {path} needs {', '.join(missing)} ({takes(target)}); give "
                          f"--{key}.init_args.{missing[0]} VALUE or set it in the config (any value YAML can "
                          "write: the argument has no type hint, so it is passed as given).")
    for k, v in init.items():
        check_given(v, f"{key}.init_args.{k}")


def sources(spec: Any) -> dict[str, Any] | None:
    """The data sources of a section written as ``{name: {class_path, init_args}, ...}`` (several sources, as
    ``train_data={"name": data}``); None for one source. The section arrives with the names under init_args."""
    if not isinstance(spec, dict) or "class_path" in spec:
        return None
    named = spec.get("init_args") or {}
    if named and all(isinstance(v, dict) and "class_path" in v for v in named.values()):
        return named
    return None


def check_spec(spec: Any, key: str) -> Any:
    """The target of a ``{class_path, init_args}`` mapping, checked; ``None`` stays ``None``."""
    if spec is None:
        return None
    named = sources(spec)
    if named is not None:
        return {name: check_spec(v, f"{key}.{name}") for name, v in named.items()}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"{key}={spec!r}: give a mapping with class_path (and optional init_args), e.g. "
                          "{class_path: cadence.demo.Digits}, or several sources as {name: {class_path: ...}, ...}.")
    path = str(spec["class_path"])
    target = import_class(path, key)
    if not callable(target):
        raise ConfigError(f"{key}.class_path={path!r}: it is a {type(target).__name__}, not a class or function.")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ConfigError(f"{key}.init_args={init_args!r}: give a mapping of argument names to values.")
    check_init_args(target, init_args, key, path)
    return target


def build(spec: Any, key: str) -> Any:
    """An object from ``{class_path, init_args}``, a ``class_path`` in its ``init_args`` (or in a list or mapping
    there) built first; a constructor's error as one sentence naming the argument and the class."""
    named = sources(spec)
    if named is not None:
        return {name: build(v, f"{key}.{name}") for name, v in named.items()}
    target = check_spec(spec, key)
    if target is None:
        return None
    init_args = {k: _built(v, f"{key}.init_args.{k}") for k, v in (spec.get("init_args") or {}).items()}
    try:
        return target(**init_args)
    except Exception as err:
        args = ", ".join(f"{k}={v!r}" for k, v in init_args.items())
        raise ConfigError(f"{key}: {spec['class_path']}({args}) failed{_raised_at(err)}: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}; fix the value of the argument it names (an argument "
                          "without a type hint is passed exactly as the config writes it).") from None


def _built(value: Any, key: str) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        return build(value, key)
    if isinstance(value, list):
        return [_built(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _built(v, f"{key}.{k}") for k, v in value.items()}
    return value


def _diagnose(cfg: Any) -> None:
    """Build the model (and the trainer's classes) again, with :func:`build`, to name what jsonargparse's
    error hides: which argument of which class failed, with the constructor's own error."""
    def plain(value: Any) -> Any:
        return value.as_dict() if type(value).__name__ == "Namespace" else value

    try:
        _built(plain(cfg.get("model")), "model")
        for name, value in _fields(cfg.get("trainer")).items():
            if name != "optimizer":  # a class_path there is given its params by cadence, not by the config
                _built(plain(value) if not isinstance(value, list) else [plain(v) for v in value], f"trainer.{name}")
    except ConfigError:
        raise
    except Exception:  # noqa: S110 - nothing clearer to say than jsonargparse's own error
        pass


DOTTED = ("optimizer", "schedule")  # options whose plain string is a name, or a dotted path to a callable


def resolve_dotted(trainer: dict[str, Any]) -> dict[str, Any]:
    """``trainer`` with a dotted-path string of :data:`DOTTED` replaced by what it names (a function, or a
    class called as one: an optimizer class is called with the parameter groups)."""
    out = dict(trainer)
    for name in DOTTED:
        value = out.get(name)
        if isinstance(value, str) and "." in value:
            target = import_class(value, f"trainer.{name}")
            if not callable(target):
                raise ConfigError(f"trainer.{name}={value!r}: it is a {type(target).__name__}, not a function or "
                                  "a class; give the dotted path of a function (or of a class called as one).")
            out[name] = target
    return out


def instantiate(parser: Any, cfg: Any) -> Any:
    """jsonargparse's ``instantiate`` (the model and the trainer's classes); a constructor's error in one
    sentence, naming the section."""
    from jsonargparse import set_parsing_settings
    from jsonargparse._common import get_parsing_setting

    # a class_path under an untyped argument is built (jsonargparse 5 will stop doing so by default), and one
    # whose constructor fails is an error, not a mapping passed on as is
    names = ("instantiate_subclass_spec_in_any", "validate_subclass_spec_in_any")
    before = {name: get_parsing_setting(name) for name in names}
    set_parsing_settings(**dict.fromkeys(names, True))
    cfg = cfg.clone()
    for section in ("data", "val_data", "test_data"):  # built by build(), not here
        if section in cfg:
            cfg[section] = None
    try:
        return parser.instantiate(cfg)
    except ConfigError:
        raise
    except Exception as err:
        _diagnose(cfg)  # raises the real reason when it finds one
        while (err.__cause__ or err.__context__) is not None:  # jsonargparse wraps the constructor's own error
            err = err.__cause__ or err.__context__  # type: ignore[assignment]
        frames = traceback.extract_tb(err.__traceback__)
        ours = [f for f in frames if "jsonargparse" not in f.filename]
        where = f" ({ours[-1].filename}:{ours[-1].lineno})" if ours else ""
        raise ConfigError(f"building the model (or a class under trainer) failed{where}: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from None
    finally:
        set_parsing_settings(**{k: v for k, v in before.items() if v is not None})


def explain_class_error(message: str) -> str | None:
    """One sentence for jsonargparse's report of a bad class path or init arg (None: not about a class)."""
    key = re.search(r'Parser key "([\w.]+)"', message)
    path = (re.search(r"Problem with given class_path '([\w.]+)'", message)
            or re.search(r"class_path'?(?::\s*|=)'([\w.]+)'", message)  # a mapping or Namespace from a config
            or re.search(r"Given value: ([\w.]+)\s*$", message.strip()))
    if key is None or path is None or "." not in path.group(1):
        return None
    key, path = key.group(1), path.group(1)
    base = re.search(r"does not correspond to a subclass of (\w+)", message)
    try:
        target = import_class(path, key)
    except ConfigError as err:
        return str(err)
    if base:
        base_name = "nn.Module" if base.group(1) == "Module" else base.group(1)
        return (f"{key}.class_path={path!r}: {path} imports, but it is not an {base_name}"
                f" (it is {'a class' if inspect.isclass(target) else 'a ' + type(target).__name__}); give a "
                f"subclass of {base_name}.")
    unknown = re.search(r"Option '([\w.]+)' is not accepted", message)
    if unknown:
        return (f"{key}.init_args.{unknown.group(1)}: unknown argument {unknown.group(1)!r} of {path} "
                f"({takes(target)}); fix the name.")
    required = re.search(r"the following arguments are required: ([\w, .]+)", message)
    if required:
        return (f"{key}.init_args: {path} needs {required.group(1).strip()} ({takes(target)}); give "
                f"--{key}.init_args.NAME VALUE or set them in the config.")
    value = re.search(r'Parser key "(\w+)":\s*\n\s*Expected a <class \'(\w+)\'>\. Got value: (.+)', message)
    if value:
        # the keys of the classes it is nested in (an untyped argument holding a class_path), outermost first
        keys = re.findall(r'Parser key "([\w.]+)"', message[:value.end()])
        owners = re.findall(r"Given value: \{'class_path': '([\w.]+)'", message)
        where = ".init_args.".join(keys) if len(keys) > 2 else f"{key}.init_args.{value.group(1)}"
        owner = owners[0] if len(keys) > 2 and owners else path
        return (f"{where}={value.group(3).strip()!r}: {owner} expects a value of type {value.group(2)} there; fix "
                "the value.")
    return None
