"""``cadence fit``: make the run folder, write the resolved config, build the parts, train."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def build(spec: Any, key: str) -> Any:
    """An object from ``{class_path, init_args}``; ``None`` stays ``None``."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"{key}={spec!r}: give a mapping with class_path (and optional init_args), e.g. "
                          "{class_path: cadence.demo.Digits}.")
    path = str(spec["class_path"])
    module, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}.class_path={path!r}: it does not import ({err}); give the full dotted path, "
                          "e.g. cadence.demo.Digits, and check that its package is installed.") from None
    return target(**(spec.get("init_args") or {}))


def default_run_dir(cfg: Any) -> Path:
    name = cfg.name
    if not name:
        configs = [c for c in (cfg.get("config") or []) if c]
        name = Path(str(configs[-1])).stem if configs else str(cfg.model.class_path).rsplit(".", 1)[-1].lower()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', str(name))}"


def claim(run_dir: Path, overwrite: bool) -> None:
    """Make sure ``run_dir`` is new (or may be replaced) and writable, before anything is built."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir={str(run_dir)!r}: it is a file; choose a folder path.")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--run-dir={str(run_dir)!r}: the folder already holds a run; continue it with --resume, "
                          "choose another --run-dir, or pass --overwrite to replace it.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".cadence-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--run-dir={str(run_dir)!r}: cannot write there ({err.strerror}); choose a folder you "
                          "can write to.") from None


def run_fit(parser: Any, cfg: Any) -> int:
    import torch

    from ..trainer import Trainer

    rank = int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume={cfg.resume!r}: no config.yaml there; give the folder of a run that "
                              "cadence fit started.")
    else:
        if not cfg.run_dir and rank is not None:
            raise ConfigError("--run-dir=None: with several processes every rank must write into the same folder; "
                              "pass --run-dir, or launch with cadence fit --nproc N, which picks one for all.")
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
        if not rank:  # rank 0 (or a single process) checks and makes the folder; the others only use it
            claim(run_dir, cfg.overwrite)
    cfg.run_dir = str(run_dir)
    torch.manual_seed(cfg.trainer.seed)  # the model's initial weights are part of the run: seed them too
    init = parser.instantiate(cfg)
    data = build(cfg.data, "data")
    val_data = build(cfg.val_data, "val_data")
    trainer = Trainer(init.model, data, val_data=val_data, run_dir=run_dir, overwrite=cfg.overwrite,
                      resume="auto" if cfg.resume else None, **dict(init.trainer))
    resolved = cfg.clone()
    resolved.config = None
    resolved.overwrite = False
    resolved.resume = None
    if trainer.is_main:
        (run_dir / "config.yaml").write_text(parser.dump(resolved, skip_unset=False))
    trainer.fit()
    if trainer.is_main:
        print(trainer.summary(), flush=True)
    return 0
