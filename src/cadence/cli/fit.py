"""``cadence fit``: make the run folder, write the resolved config, build the parts, train."""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..rundir import check_config_file, check_run_dir, removed_on_failure, unique_run_dir
from .classes import build, instantiate, resolve_dotted  # objects from class_path + init_args; errors in one sentence


def default_run_dir(cfg: Any) -> Path:
    name = cfg.name
    if not name:
        configs = [c for c in (cfg.get("config") or []) if c]
        name = Path(str(configs[-1])).stem if configs else str(cfg.model.class_path).rsplit(".", 1)[-1].lower()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', str(name))}"


def resume_folder(cfg: Any) -> Path:
    """The run folder ``--resume`` names, checked: it exists, cadence fit started it, no other --run-dir."""
    from ..runs import read_config

    run_dir = Path(cfg.resume)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume={cfg.resume!r}: no such folder; give the folder of a run that cadence fit "
                          "started (see `cadence runs`).")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume={cfg.resume!r}: no config.yaml there; give the folder of a run that "
                          "cadence fit started.")
    stored = read_config(run_dir).get("run_dir")  # --run-dir from the run's own config.yaml, not the user
    if cfg.run_dir and cfg.run_dir != stored and Path(cfg.run_dir).resolve() != run_dir.resolve():
        raise ConfigError(f"--run-dir={cfg.run_dir!r}: --resume {cfg.resume!r} continues the run in its own "
                          "folder; drop --run-dir (or copy the run folder and resume the copy).")
    return run_dir


def run_fit(parser: Any, cfg: Any) -> int:
    """Check the run folder (read only), then build and train; the folder is written only by ``fit()``."""
    rank = int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None
    made = False  # a default folder is made at once (atomically, so runs started together never share one)
    if cfg.resume:
        run_dir = resume_folder(cfg)
    elif cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if not rank:  # rank 0 (or a single process) checks; the folder is made when fit() starts
            check_run_dir(run_dir, cfg.overwrite, name="--run-dir")
            check_config_file(run_dir, cfg.overwrite)
    elif rank is not None:
        raise ConfigError("--run-dir=None: with several processes every rank must write into the same folder; "
                          "pass --run-dir, or launch with cadence fit --nproc N, which picks one for all.")
    else:
        run_dir, made = unique_run_dir(default_run_dir(cfg)), True
    cfg.run_dir = str(run_dir)
    with removed_on_failure(run_dir, made):  # a run that fails its checks leaves no empty folder behind
        return _train(parser, cfg, run_dir)


def _train(parser: Any, cfg: Any, run_dir: Path) -> int:
    from ..arguments import check_seeds
    from ..device import seed_everything
    from ..trainer import Trainer

    check_seeds(dict(cfg.trainer))  # a seed torch cannot take is named here, before it seeds the model
    # the model's initial weights are part of the run: seed torch, and random and numpy, which some research
    # constructors draw from
    seed_everything(cfg.trainer.seed)
    init = instantiate(parser, cfg)
    data = build(cfg.data, "data")
    val_data = build(cfg.val_data, "val_data")
    test_data = build(cfg.get("test_data"), "test_data")
    trainer = Trainer(init.model, data, val_data=val_data, run_dir=run_dir, overwrite=cfg.overwrite,
                      resume="auto" if cfg.resume else None, **resolve_dotted(dict(init.trainer)))
    resolved = cfg.clone()
    resolved.config = None
    resolved.overwrite = False
    resolved.resume = None
    # written by fit() once it holds the folder and resuming succeeded: a failed start leaves the old one as it was
    trainer.run_folder.config_yaml = parser.dump(resolved, skip_unset=False)
    if trainer.is_main:  # before the first step (and any compiling): where to look, at once
        print(f"run folder: {run_dir}", flush=True)
    try:
        trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C: fit() saved the step in progress and said so (unless the second Ctrl-C)
        if trainer.stop_reason is None and trainer.is_main:
            print(f"cadence: interrupted at step {trainer.step}, nothing saved", file=sys.stderr, flush=True)
        return 130
    line = trainer.summary()
    if test_data is not None:
        line += "".join(f" {k.replace('/', '_')}={v:.4f}" for k, v in trainer.test(test_data).items())
    if trainer.is_main:
        print(line, flush=True)
    return 0
