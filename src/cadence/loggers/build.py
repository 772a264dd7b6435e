"""From ``loggers=("jsonl", "tensorboard", ...)`` to logger objects, and from records to tracker scalars.

Each tracker is imported only when it is asked for, so ``import cadence`` never pays for TensorBoard, W&B or
MLflow. ``metrics.jsonl`` is always written (it is what ``cadence report`` and ``cadence runs`` read).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import bad
from . import Logger

# name -> (module.Class, packages that must be importable, pip extra)
TRACKERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "jsonl": ("cadence.loggers.jsonl.JsonlLogger", (), ""),
    "tensorboard": ("cadence.loggers.tensorboard.TensorBoardLogger", ("tensorboard",), "tensorboard"),
    "wandb": ("cadence.loggers.wandb.WandbLogger", ("wandb",), "wandb"),
    "mlflow": ("cadence.loggers.mlflow.MlflowLogger", ("mlflow", "sqlalchemy", "alembic"), "mlflow"),
}

# Keys of a train record that become top-level scalars (no "train/" prefix), as trackers usually name them.
TOP_LEVEL = ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu")


def check_loggers(names: str | Iterable[str], has_run_dir: bool = True) -> tuple[str, ...]:
    """The names, checked (known, package installed, a run folder to write to) without importing anything.

    ``"jsonl"`` always comes first. Cheap enough to call when the ``Trainer`` is built, so a typo or a
    missing package fails before any training.
    """
    given = (names,) if isinstance(names, str) else tuple(names)
    for name in given:
        if name not in TRACKERS:
            raise bad("loggers", list(given), f"{name!r} is not a logger; use some of {list(TRACKERS)}, "
                      'e.g. loggers=["jsonl", "tensorboard"] (--trainer.loggers \'[jsonl, tensorboard]\').')
        _, packages, extra = TRACKERS[name]
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            raise bad("loggers", list(given), f"{name!r} needs the package(s) {', '.join(missing)}, which are "
                      f'not installed; run pip install "cadence[{extra}]", or leave {name!r} out.')
    checked = tuple(dict.fromkeys(("jsonl", *given)))
    if not has_run_dir and len(checked) > 1:
        raise bad("loggers", list(given), "trackers write into the run folder; pass run_dir=... (--run-dir), or "
                  "leave out " + ", ".join(checked[1:]) + ".")
    return checked


def build_loggers(names: str | Iterable[str], run_dir: str | Path | None,
                  config: Mapping[str, Any] | None = None, start_step: int = 0) -> list[Logger]:
    """One logger per name, writing into ``run_dir``; ``config`` goes to each tracker as hyperparameters.

    ``start_step`` is the step training starts (or resumes) from: TensorBoard hides what an earlier attempt
    logged after it. Call on rank 0 only. Without a run folder nothing is written, and trackers are refused.
    """
    checked = check_loggers(names, has_run_dir=run_dir is not None)
    if run_dir is None:
        return []
    run_dir = Path(run_dir)
    flat = flatten(config or {})
    loggers: list[Logger] = []
    try:
        for name in checked:
            module, _, cls = TRACKERS[name][0].rpartition(".")
            factory = getattr(importlib.import_module(module), cls)
            if name == "jsonl":
                loggers.append(factory(run_dir / "metrics.jsonl"))
            else:
                loggers.append(factory(run_dir, flat, start_step=start_step))
    except BaseException:
        for logger in loggers:  # do not leave a half-open set of trackers behind
            logger.close()
        raise
    return loggers


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's values under tracker names: ``train/loss``, ``train/<part>``, ``val/...``, ``lr``, ...

    Event records (such as a skipped non-finite step) carry no ``loss`` and give nothing; they stay in
    ``metrics.jsonl``.
    """
    if "loss" not in record:
        return {}
    split = record.get("split", "train")
    out = {f"{split}/loss": float(record["loss"])}
    out.update({f"{split}/{k}": float(v) for k, v in (record.get("parts") or {}).items()})
    out.update({k: float(record[k]) for k in TOP_LEVEL if record.get(k) is not None})
    return out


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """``{"trainer": {"lr": 0.1}}`` -> ``{"trainer.lr": 0.1}``; lists and ``None`` become JSON text."""
    if hasattr(config, "as_dict"):  # a jsonargparse Namespace (the resolved CLI config)
        config = config.as_dict()
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "as_dict"):
            value = value.as_dict()
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat
