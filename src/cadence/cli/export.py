"""``cadence export RUN -o model.safetensors [--ema] [--best]``: a run's newest (or best) weights, alone, in one
file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoints
from ..checkpoint.format import read_tensors
from ..errors import ConfigError


def best_checkpoint(run: Path) -> Path:
    """The checkpoint that the run's ``trainer.keep_best`` (from its config.yaml) kept."""
    from ..runs import read_config

    keep_best = (read_config(run).get("trainer") or {}).get("keep_best")
    if not keep_best:
        raise ConfigError(f"--best: the run {str(run)!r} was not trained with keep_best (no trainer.keep_best in its "
                          "config.yaml); export its newest weights without --best.")
    best = Checkpoints(run / "checkpoints", keep_best=tuple(keep_best)).best()
    if best is None:
        raise ConfigError(f"--best: the run {str(run)!r} has no checkpoint with a value of {keep_best[0]!r} yet; "
                          "export its newest weights without --best.")
    return best


def export(cfg: Any) -> int:
    run, output = Path(cfg.run), Path(cfg.output)
    name = "ema.safetensors" if cfg.ema else "model.safetensors"
    if cfg.get("best"):
        source = best_checkpoint(run) / name
    else:
        found = Checkpoints(run / "checkpoints").latest()
        source = found[0] / name if found else run / "final" / name
    if not source.is_file():
        what = "EMA weights (train with ema=EMA(...))" if cfg.ema else "weights"
        raise ConfigError(f"run={str(run)!r}: it holds no {what}: no valid checkpoint and no final/{name}; give "
                          "the folder of a run that cadence fit started.")
    if output.exists() and not cfg.overwrite:
        raise ConfigError(f"--output={str(output)!r}: the file exists; choose another path or pass --overwrite.")
    read_tensors(source)  # refuse anything that is not a valid safetensors file
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, output)
    print(f"wrote {output} from {source}")
    return 0
