"""What a checkpoint of a running ``Trainer`` holds, and putting it back.

``capture`` gathers everything as CPU tensors and JSON (with ``staging``, private copies, so a background
thread can write them while training goes on); ``restore`` checks that the checkpoint fits this run and
loads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.identity import ORDER_ARGUMENTS
from ..errors import ConfigError
from ..rundir import notice
from ..version import __version__
from ..weights import host_tensors
from . import resize, tree
from .format import FORMAT, read_json, read_tensors
from .staging import Staging
from .state import rng_state, set_rng_state

if TYPE_CHECKING:
    from ..trainer import Trainer

def run_identity(trainer: Trainer) -> dict[str, Any]:
    return {"data_length": trainer.data_length, "batch_size": trainer.batch_size,
            "grad_accum": trainer.grad_accum, "world_size": trainer.world_size, "seed": trainer.seed,
            **trainer._order_arguments}


def capture(trainer: Trainer, staging: Staging | None = None) -> dict[str, Any]:
    """The checkpoint's files as name -> tensors (``.safetensors``) or JSON-able values (``.json``).

    The model's weights, the optimizer and the random generators come from them; everything else is
    ``trainer.state_dict()``: its JSON in ``trainer.json``, its tensors in ``state.safetensors`` (the EMA's
    weights in ``ema.safetensors``). With ``staging`` every tensor is copied into its buffers, so the files
    hold this step's state whatever training does next; the caller must not reuse ``staging`` before the files
    are written.
    """
    def copier(file: str) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
        return staging.copier(file) if staging is not None else None

    files: dict[str, Any] = {rng_file(trainer.rank, trainer.world_size): rng_state()}
    if trainer.world_size > 1:  # each rank's own losses since the last log point (averaged over ranks when logged)
        files[running_file(trainer.rank)] = host_tensors(trainer.running.state_tensors(), copier("running"))
    # the weights and the optimizer: written once by rank 0 (replicated) or by every rank (its shards)
    files.update(trainer.strategy.checkpoint_files(trainer.model, trainer.optimizer, copier))
    if not trainer.is_main:  # the rest is replicated, written once, by rank 0; every rank writes its RNG
        return files
    state = trainer.state_dict()
    ema = state.pop("ema")
    meta, tensors = tree.split(state, "state")
    identity = run_identity(trainer)
    files["trainer.json"] = {
        "strategy": trainer.strategy.name,
        "format": FORMAT,
        "cadence_version": __version__,
        "torch_version": torch.__version__,
        **identity,
        "config_hash": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16],
        "grad_accum_given": trainer._arguments["grad_accum"],  # grad_accum is what it trained with (resize.py)
        **meta,
    }
    if ema is not None:
        files["ema.safetensors"] = host_tensors(ema, copier("ema"))
    if tensors:
        files["state.safetensors"] = host_tensors(tensors, copier("state"))
    if staging is not None:  # a background writer must see the state of this step, not what the loop changes next
        files["trainer.json"] = json.loads(json.dumps(files["trainer.json"]))
        staging.finish()
    return files


def restore(trainer: Trainer, folder: Path) -> None:
    """Load the checkpoint ``folder`` into ``trainer`` (built with the same arguments, or at another world size
    with the same global batch: see :mod:`.resize`)."""
    meta = read_json(folder / "trainer.json")
    change = check_fits(trainer, folder, meta)
    state = read_state(folder, meta)
    if change.now.grad_accum != trainer.grad_accum:
        trainer._regroup(change.now.grad_accum)  # the data stream splits the same global batch anew
    if change.message is not None and trainer.is_main:
        notice(change.message)
    if change.restart:
        state["data"] = resize.restart_position(state["data"])
    trainer.strategy.load_model_files(trainer.model, folder, state.get("model") or {})
    if trainer.ema is not None and state.get("ema") is None:
        raise ConfigError(f"resume={str(folder)!r}: the checkpoint has no EMA weights but this run has ema=...; "
                          "resume without ema, or start a new run.")
    trainer.load_state_dict(state)
    trainer.strategy.load_optimizer_files(trainer.optimizer, folder)
    for group in trainer.optimizer.param_groups:  # tensors come back on the CPU; the optimizer expects its device
        for p in group["params"]:
            for key, value in trainer.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and value.device != p.device:
                    trainer.optimizer.state[p][key] = value.to(p.device)
    saved_world = int(meta.get("world_size", trainer.world_size))
    if saved_world == trainer.world_size:
        set_rng_state(read_tensors(folder / rng_file(trainer.rank, trainer.world_size)))
        own = folder / running_file(trainer.rank)
        if trainer.world_size > 1 and own.exists():  # trainer.json has rank 0's (and cadence 0.1 only those)
            trainer.running.load_state(read_tensors(own), None)
        return
    set_rng_state(read_tensors(resize.rng_source(folder, trainer.rank, saved_world)))
    running = resize.mean_running(folder, saved_world)
    if running is not None:  # every new rank: the old ranks' mean (what the next log point averages)
        trainer.running.load_state(running, None)


def check_fits(trainer: Trainer, folder: Path, meta: dict[str, Any]) -> resize.Plan:
    """Refuse a checkpoint of a newer format or of other data arguments (but another world size with the same
    global batch); what the resume changes. (Any strategy reads the weights any other wrote.)"""
    if meta.get("format", FORMAT) > FORMAT:
        raise ConfigError(f"resume={str(folder)!r}: written by cadence {meta.get('cadence_version')} in checkpoint "
                          f"format {meta['format']}, newer than this cadence {__version__} reads; upgrade cadence.")
    now = trainer._order_arguments
    changed = [f"{k} {meta[k]} -> {now[k]}" for k in ORDER_ARGUMENTS if k in meta and meta[k] != now[k]]
    if changed:
        raise ConfigError(f"resume={str(folder)!r}: the run changed since this checkpoint ({'; '.join(changed)}); "
                          "an exact resume needs the same data and every option that decides which items train "
                          "and in what order (the split, the sampling, the sources) as they were. Put them back, "
                          "or start a new run.")
    return resize.plan(trainer, folder, meta)


def read_state(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``trainer.state_dict()`` as saved: ``trainer.json`` with the tensors of ``state.safetensors`` put back
    (and those of ``running.safetensors``, where checkpoints of cadence 0.1 kept them)."""
    path = folder / "state.safetensors"
    state = tree.join(meta, read_tensors(path) if path.exists() else {})
    legacy = folder / "running.safetensors"
    if legacy.exists():
        state["running"] = {**(state.get("running") or {}), "values": read_tensors(legacy)}
    ema = folder / "ema.safetensors"
    state["ema"] = read_tensors(ema) if ema.exists() else None
    return state


def rng_file(rank: int, world_size: int) -> str:
    return "rng.safetensors" if world_size == 1 else f"rng-rank{rank:05d}.safetensors"


def running_file(rank: int) -> str:
    return f"running-rank{rank:05d}.safetensors"


