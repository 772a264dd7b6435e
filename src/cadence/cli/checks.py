"""Checks of a parsed ``cadence fit`` config that jsonargparse cannot make, run before anything is built.

- The data sections' class paths import and their ``init_args`` are the class's own parameters.
- An optimizer given by class path and ``trainer.lr`` / ``trainer.weight_decay`` are one setting: cadence
  builds the parameter groups with ``trainer.lr`` (the peak of the schedule) and ``trainer.weight_decay``, which
  override the optimizer's own. An option given to the optimizer is therefore carried over to the trainer; two
  different values given at the same level (both on the command line, or both in config files) are an error,
  and a value on the command line wins over one from a config file. Either way both places then hold the value
  that runs, so ``config.yaml`` records what actually ran.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .classes import check_given, check_spec, import_class

SHARED = ("lr", "weight_decay")  # the trainer's options that become every parameter group's
DATA_SECTIONS = ("data", "val_data", "test_data")


def check_fit(cfg: Any, argv: list[str]) -> None:
    """Check the data sections and reconcile the optimizer's options with the trainer's (in place)."""
    for key in DATA_SECTIONS:
        if key in cfg:
            check_spec(cfg.get(key), key)
    check_given(cfg.get("model"), "model")
    check_given({k: v for k, v in vars(cfg.trainer).items() if k != "optimizer"}, "trainer")  # cadence gives
    # an optimizer class its parameter groups
    reconcile_optimizer(cfg, argv)


def check_trainer_values(cfg: Any) -> None:
    """The Trainer's checks of plain values (``max_steps=-1``...), for the ``--nproc`` launcher to make once
    before starting workers that would each fail on them."""
    from torch import nn

    from ..arguments import check_basic
    from ..trainer import Trainer
    from .classes import build

    values = {k: p.default for k, p in inspect.signature(Trainer).parameters.items()}
    values.update(cfg.trainer.as_dict() if hasattr(cfg.trainer, "as_dict") else dict(cfg.trainer))
    values.update(model=nn.Module(), train_data=cfg.get("data"), val_data=cfg.get("val_data"))
    # the workers always get a run folder: --run-dir, --resume's, or the one the launcher makes
    values.update(run_dir=cfg.get("run_dir") or cfg.get("resume") or "runs")
    try:
        for key in ("ema", "plateau"):  # given as class_path + init_args: checked as the objects they build
            if isinstance(values.get(key), Mapping) and "class_path" in values[key]:
                values[key] = build(values[key], f"trainer.{key}")
        check_basic(values)
    except ConfigError:
        raise
    except Exception:  # a value only the built Trainer can judge (a class not yet built): the workers check it
        return


def _given(argv: list[str], *keys: str) -> bool:
    """Whether one of ``--KEY`` appears on the command line (as ``--KEY V`` or ``--KEY=V``)."""
    return any(a.split("=", 1)[0] in {f"--{k}" for k in keys} for a in argv)


def _default(target: Any, name: str) -> Any:
    try:
        param = inspect.signature(target).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is param.empty else param.default


def reconcile_optimizer(cfg: Any, argv: list[str]) -> None:
    """Make ``trainer.NAME`` and ``trainer.optimizer.init_args.NAME`` agree for lr and weight_decay."""
    from ..trainer import Trainer

    spec = cfg.trainer.get("optimizer")
    if isinstance(spec, str) and "." in spec:  # a dotted path in a config file: the class or function itself
        import_class(spec, "trainer.optimizer")
        return
    init = spec.get("init_args") if hasattr(spec, "get") and spec.get("class_path") else None
    if init is None:
        return
    target = import_class(spec.class_path, "trainer.optimizer")
    for name in SHARED:
        if name not in init:
            continue
        ours, theirs = cfg.trainer[name], init[name]
        if ours == theirs:
            continue
        theirs_set = theirs != _default(target, name)
        ours_set = ours != _default(Trainer, name)
        theirs_cli = _given(argv, f"trainer.optimizer.{name}", f"trainer.optimizer.init_args.{name}")
        ours_cli = _given(argv, f"trainer.{name}")
        if theirs_set and (not ours_set or (theirs_cli and not ours_cli)):
            cfg.trainer[name] = theirs  # the optimizer's own option, carried to the schedule's peak
        elif not theirs_set or (ours_cli and not theirs_cli):
            init[name] = ours  # the optimizer runs at the trainer's value: record that
        else:
            raise ConfigError(
                f"trainer.optimizer.init_args.{name}={theirs!r} and trainer.{name}={ours!r} disagree: cadence "
                f"gives every parameter group trainer.{name}, so give the value in one place (or the same in "
                "both).")
