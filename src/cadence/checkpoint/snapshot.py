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

from ..errors import ConfigError
from ..version import __version__
from ..weights import clean_state_dict, load_model, strip_compiled
from . import tree
from .format import FORMAT, read_json, read_tensors
from .staging import Staging
from .state import load_local_shards, load_optimizer, local, optimizer_state, rng_state, set_rng_state

if TYPE_CHECKING:
    from ..trainer import Trainer

# Arguments that fix which items each step sees: a resume that changes them cannot be exact.
DATA_KEYS = ("data_length", "batch_size", "grad_accum", "world_size", "seed")


def run_identity(trainer: Trainer) -> dict[str, Any]:
    return {"data_length": trainer.data_length, "batch_size": trainer.batch_size,
            "grad_accum": trainer.grad_accum, "world_size": trainer.world_size, "seed": trainer.seed}


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

    rank = trainer.rank
    files: dict[str, Any] = {rng_file(rank, trainer.world_size): rng_state()}
    sharded = trainer.strategy.name == "fsdp"
    if sharded:  # every rank writes its own shards of the weights and of the optimizer state
        opt_tensors, opt_meta = optimizer_state(trainer.optimizer)
        shards = {strip_compiled(k): local(v).detach().to("cpu").clone()
                  for k, v in trainer.model.state_dict().items()}
        files.update({f"model-rank{rank:05d}.safetensors": shards,
                      f"optimizer-rank{rank:05d}.safetensors": opt_tensors,
                      f"optimizer-rank{rank:05d}.json": opt_meta})
    if not trainer.is_main:  # replicated state is written once, by rank 0; every rank writes its RNG
        return files
    if not sharded:
        files["model.safetensors"] = clean_state_dict(trainer.model, copier("model"))
        opt_tensors, opt_meta = optimizer_state(trainer.optimizer, copier("optimizer"))
        files.update({"optimizer.safetensors": opt_tensors, "optimizer.json": opt_meta})
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
        **meta,
    }
    if ema is not None:
        files["ema.safetensors"] = tree.host_copies(ema, copier("ema"))
    if tensors:
        files["state.safetensors"] = tree.host_copies(tensors, copier("state"))
    if staging is not None:  # a background writer must see the state of this step, not what the loop changes next
        files["trainer.json"] = json.loads(json.dumps(files["trainer.json"]))
        staging.finish()
    return files


def restore(trainer: Trainer, folder: Path) -> None:
    """Load the checkpoint ``folder`` into ``trainer`` (already built with the same arguments)."""
    meta = read_json(folder / "trainer.json")
    check_fits(trainer, folder, meta)
    state = read_state(folder, meta)
    sharded = trainer.strategy.name == "fsdp"
    suffix = f"-rank{trainer.rank:05d}" if sharded else ""
    if sharded:
        load_local_shards(trainer.model, read_tensors(folder / f"model{suffix}.safetensors"), str(folder))
    else:  # the modules' get_extra_state() go back with the weights, as load_state_dict takes them
        load_model(trainer.model, {**read_tensors(folder / "model.safetensors"), **(state.get("model") or {})},
                   str(folder))
    if trainer.ema is not None and state.get("ema") is None:
        raise ConfigError(f"resume={str(folder)!r}: the checkpoint has no EMA weights but this run has ema=...; "
                          "resume without ema, or start a new run.")
    trainer.load_state_dict(state)
    load_optimizer(trainer.optimizer, read_tensors(folder / f"optimizer{suffix}.safetensors"),
                   read_json(folder / f"optimizer{suffix}.json"))
    for group in trainer.optimizer.param_groups:  # tensors come back on the CPU; the optimizer expects its device
        for p in group["params"]:
            for key, value in trainer.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and value.device != p.device:
                    trainer.optimizer.state[p][key] = value.to(p.device)
    set_rng_state(read_tensors(folder / rng_file(trainer.rank, trainer.world_size)))


def check_fits(trainer: Trainer, folder: Path, meta: dict[str, Any]) -> None:
    """Refuse a checkpoint of a newer format, of other data arguments or of another strategy."""
    if meta.get("format", FORMAT) > FORMAT:
        raise ConfigError(f"resume={str(folder)!r}: written by cadence {meta.get('cadence_version')} in checkpoint "
                          f"format {meta['format']}, newer than this cadence {__version__} reads; upgrade cadence.")
    now = run_identity(trainer)
    changed = [f"{k} {meta.get(k)} -> {now[k]}" for k in DATA_KEYS if k in meta and meta[k] != now[k]]
    if changed:
        raise ConfigError(f"resume={str(folder)!r}: the run changed since this checkpoint ({'; '.join(changed)}); "
                          "an exact resume needs the same data, batch_size, grad_accum, world size and seed. "
                          "Put them back, or start a new run.")
    if (trainer.strategy.name == "fsdp") != (meta.get("strategy") == "fsdp"):
        raise ConfigError(f"resume={str(folder)!r}: saved with strategy {meta.get('strategy')!r}, resumed with "
                          f"{trainer.strategy.name!r}; use the same strategy.")


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


