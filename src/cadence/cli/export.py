"""``cadence export RUN -o model.safetensors [--ema] [--best]``: a run's newest (or best) weights, alone, in one
file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoints
from ..checkpoint.format import read_json, read_tensors
from ..distributed import strategy_class
from ..errors import ConfigError
from ..weights import write_safetensors


def best_checkpoint(run: Path) -> Path:
    """The checkpoint that the run's ``trainer.keep_best`` (from its config.yaml, else as its newest checkpoint
    recorded it: a run trained from Python) kept."""
    from ..runs import read_config

    keep_best = (read_config(run).get("trainer") or {}).get("keep_best")
    found = Checkpoints(run / "checkpoints").latest() if not keep_best else None
    recorded = read_json(found[0] / "trainer.json").get("best") if found else None
    if recorded:
        keep_best = (recorded["metric"], recorded["mode"])
    if not keep_best:
        raise ConfigError(f"--best: the run {str(run)!r} was not trained with keep_best (no trainer.keep_best in its "
                          "config.yaml nor in its checkpoints); export its newest weights without --best.")
    checkpoints = Checkpoints(run / "checkpoints", keep_best=tuple(keep_best))
    best = checkpoints.best()
    newest = checkpoints.latest()
    recorded = read_json(newest[0] / "trainer.json").get("best") if newest is not None else None
    if recorded and recorded.get("step") is not None and (
            best is None or best.name != checkpoints.path(recorded["step"]).name):
        gone = checkpoints.path(recorded["step"])
        raise ConfigError(f"--best: the best checkpoint of the run {str(run)!r}, {gone.name} ({keep_best[0]}="
                          f"{recorded['value']:.6g}, as its newest checkpoint {newest[0].name} records), is gone; the "
                          f"best one left is {best.name if best else 'none'}. Put the folder back, or export the "
                          "newest weights without --best.")
    if best is None:
        raise ConfigError(f"--best: the run {str(run)!r} has no checkpoint with a value of {keep_best[0]!r} yet; "
                          "export its newest weights without --best.")
    return best


def export(cfg: Any) -> int:
    run, output = Path(cfg.run), Path(cfg.output)
    name = "ema.safetensors" if cfg.ema else "model.safetensors"
    if cfg.get("best"):
        folder: Path | None = best_checkpoint(run)
    else:
        found = Checkpoints(run / "checkpoints").latest()
        folder = found[0] if found else None
    # a checkpoint's whole weights, as the strategy that wrote it keeps them (FSDP: joined from every rank's shards)
    weights = checkpoint_weights(folder, name) if folder is not None else run / "final" / name
    if isinstance(weights, Path) and not weights.is_file():
        what = "EMA weights (train with ema=EMA(...))" if cfg.ema else "weights"
        raise ConfigError(f"run={str(run)!r}: it holds no {what}: no valid checkpoint and no final/{name}; give "
                          "the folder of a run that cadence fit started.")
    if output.exists() and not cfg.overwrite:
        raise ConfigError(f"--output={str(output)!r}: the file exists; choose another path or pass --overwrite.")
    if isinstance(weights, Path):
        read_tensors(weights)  # refuse anything that is not a valid safetensors file
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, output)
    else:
        write_safetensors(weights, output)
    print(f"wrote {output} from {folder / name if folder is not None else weights}")
    return 0


def checkpoint_weights(folder: Path, name: str) -> Path | dict[str, Any]:
    """The file ``name`` of a checkpoint, or (sharded) its tensors joined, by the strategy that saved it."""
    return strategy_class(read_json(folder / "trainer.json").get("strategy")).checkpoint_weights(folder, name)
