"""What a checkpoint of a running ``Trainer`` holds, and putting it back.

``capture`` gathers everything as CPU tensors and JSON (with ``staging``, private copies, so a background
thread can write them while training goes on); ``restore`` checks that the checkpoint fits this run and
loads it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..weights import COMPILED_PREFIX, clean_state_dict
from .format import FORMAT, commit, entries_on_disk, read_json, read_tensors, temp_folder, write_checkpoint, write_files
from .staging import Staging
from .state import load_local_shards, load_model, load_optimizer, local, optimizer_state, rng_state, set_rng_state
from .store import Checkpoints

if TYPE_CHECKING:
    from ..distributed import Strategy
    from ..trainer import Trainer

# Arguments that fix which items each step sees: a resume that changes them cannot be exact.
DATA_KEYS = ("data_length", "batch_size", "grad_accum", "world_size", "seed")


def run_identity(trainer: Trainer) -> dict[str, Any]:
    return {"data_length": trainer.data_length, "batch_size": trainer.batch_size,
            "grad_accum": trainer.grad_accum, "world_size": trainer.world_size, "seed": trainer.seed}


def capture(trainer: Trainer, staging: Staging | None = None) -> dict[str, Any]:
    """The checkpoint's files as name -> tensors (``.safetensors``) or JSON-able values (``.json``).

    With ``staging`` every tensor is copied into its buffers, so the files hold this step's state whatever
    training does next; the caller must not reuse ``staging`` before the files are written.
    """
    from .. import __version__

    def copier(file: str) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
        return staging.copier(file) if staging is not None else None

    def own(file: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: staging.copy(f"{file}/{k}", v) for k, v in tensors.items()} if staging is not None else tensors

    rank = trainer.rank
    rng = {rng_file(rank, trainer.world_size): rng_state()}
    sharded = trainer.strategy.name == "fsdp"
    if sharded:  # every rank writes its own shards of the weights and of the optimizer state
        opt_tensors, opt_meta = optimizer_state(trainer.optimizer)
        shards = {k.replace(COMPILED_PREFIX, ""): local(v).detach().to("cpu").clone()
                  for k, v in trainer.model.state_dict().items()}
        rng.update({f"model-rank{rank:05d}.safetensors": shards,
                    f"optimizer-rank{rank:05d}.safetensors": opt_tensors,
                    f"optimizer-rank{rank:05d}.json": opt_meta})
    if not trainer.is_main:  # replicated state is written once, by rank 0; every rank writes its RNG
        return rng
    if not sharded:
        rng.update({"model.safetensors": clean_state_dict(trainer.model, copier("model"))})
        opt_tensors, opt_meta = optimizer_state(trainer.optimizer, copier("optimizer"))
        rng.update({"optimizer.safetensors": opt_tensors, "optimizer.json": opt_meta})
    identity = run_identity(trainer)
    scaler = trainer.precision.scaler
    files: dict[str, Any] = {
        **rng,
        "trainer.json": {
            "strategy": trainer.strategy.name,
            "format": FORMAT,
            "cadence_version": __version__,
            "torch_version": torch.__version__,
            "step": trainer.step,
            "data": trainer.stream.state_dict(),
            **identity,
            "config_hash": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16],
            "scaler": scaler.state_dict() if scaler is not None else None,
            "nonfinite": trainer.nonfinite_in_a_row,
            "nonfinite_total": trainer.nonfinite_total,
            "metrics": dict(trainer.last_val_metrics),
            "callbacks": {str(i): cb.state_dict() for i, cb in enumerate(trainer.callbacks)
                          if hasattr(cb, "state_dict")},
            "early_stopping": [s.state_dict() for s in trainer.early_stopping],
            "running": trainer.running.state_json(),
            "should_stop": trainer.should_stop,
            "stop_reason": trainer.stop_reason,
            "validated_at": trainer._validated_at,
            "records": len(trainer.history),
        },
    }
    if trainer.ema is not None:
        files["ema.safetensors"] = trainer.ema.state_tensors(copier("ema"))
    if staging is not None:  # a background writer must see the state of this step, not what the loop changes next
        files["trainer.json"] = json.loads(json.dumps(files["trainer.json"]))
    running = trainer.running.state_tensors()
    if running:
        files["running.safetensors"] = own("running", running)
    if staging is not None:
        staging.finish()
    return files


def restore(trainer: Trainer, folder: Path) -> None:
    """Load the checkpoint ``folder`` into ``trainer`` (already built with the same arguments)."""
    from .. import __version__

    meta = read_json(folder / "trainer.json")
    if meta.get("format", FORMAT) > FORMAT:
        raise ConfigError(f"resume={str(folder)!r}: written by cadence {meta.get('cadence_version')} in checkpoint "
                          f"format {meta['format']}, newer than this cadence {__version__} reads; upgrade cadence.")
    now = run_identity(trainer)
    changed = [f"{k} {meta.get(k)} -> {now[k]}" for k in DATA_KEYS if k in meta and meta[k] != now[k]]
    if changed:
        raise ConfigError(f"resume={str(folder)!r}: the run changed since this checkpoint ({'; '.join(changed)}); "
                          "an exact resume needs the same data, batch_size, grad_accum, world size and seed. "
                          "Put them back, or start a new run.")
    sharded = trainer.strategy.name == "fsdp"
    if sharded != (meta.get("strategy") == "fsdp"):
        raise ConfigError(f"resume={str(folder)!r}: saved with strategy {meta.get('strategy')!r}, resumed with "
                          f"{trainer.strategy.name!r}; use the same strategy.")
    suffix = f"-rank{trainer.rank:05d}" if sharded else ""
    if sharded:
        load_local_shards(trainer.model, read_tensors(folder / f"model{suffix}.safetensors"), str(folder))
    else:
        load_model(trainer.model, read_tensors(folder / "model.safetensors"), str(folder))
    trainer.step = int(meta["step"])
    # the optimizer of the stage of the last step taken (the one saved); the loop moves on to the next stage
    trainer._sync_stage(max(trainer.step - 1, 0))
    load_optimizer(trainer.optimizer, read_tensors(folder / f"optimizer{suffix}.safetensors"),
                   read_json(folder / f"optimizer{suffix}.json"))
    for group in trainer.optimizer.param_groups:  # tensors come back on the CPU; the optimizer expects its device
        for p in group["params"]:
            for key, value in trainer.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and value.device != p.device:
                    trainer.optimizer.state[p][key] = value.to(p.device)
    set_rng_state(read_tensors(folder / rng_file(trainer.rank, trainer.world_size)))
    if trainer.precision.scaler is not None and meta.get("scaler"):
        trainer.precision.scaler.load_state_dict(meta["scaler"])
    trainer.stream.load_state_dict(meta["data"])
    trainer.nonfinite_in_a_row = int(meta.get("nonfinite", 0))
    trainer.nonfinite_total = int(meta.get("nonfinite_total", 0))
    trainer.last_val_metrics = dict(meta.get("metrics", {}))
    for index, state in meta.get("callbacks", {}).items():
        trainer.callbacks[int(index)].load_state_dict(state)
    trainer.should_stop, trainer.stop_reason = bool(meta.get("should_stop")), meta.get("stop_reason")
    trainer._validated_at = meta.get("validated_at")
    trainer.records_at_checkpoint = meta.get("records")
    trainer._saved_at, trainer._saved_records = trainer.step, meta.get("records")
    for stopper, state in zip(trainer.early_stopping, meta.get("early_stopping", [])):
        stopper.load_state_dict(state)
    if trainer.ema is not None:
        if not (folder / "ema.safetensors").exists():
            raise ConfigError(f"resume={str(folder)!r}: the checkpoint has no EMA weights but this run has ema=...; "
                              "resume without ema, or start a new run.")
        trainer.ema.load_state_tensors(read_tensors(folder / "ema.safetensors"))
    running = folder / "running.safetensors"
    trainer.running.load_state(read_tensors(running) if running.exists() else {}, meta.get("running"))


def rng_file(rank: int, world_size: int) -> str:
    return "rng.safetensors" if world_size == 1 else f"rng-rank{rank:05d}.safetensors"


class Saver:
    """Writes checkpoints: in the calling thread, in one background thread (``background=True``, a single
    process), or with several processes (each writes its files into one shared temporary folder, rank 0
    writes the manifest and commits)."""

    def __init__(self, store: Checkpoints, strategy: Strategy, background: bool = False) -> None:
        self.store, self.strategy = store, strategy
        self.background = background and strategy.world_size == 1
        # the background writer's copies of the state; refilled only once the write that reads them is done
        self.staging = Staging() if self.background else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, files: dict[str, Any]) -> None:
        self.wait()
        if self.strategy.world_size > 1:
            self._write_together(step, files)
        elif not self.background:
            self._write(step, files)
        else:
            self._thread = threading.Thread(target=self._write_catching, args=(step, files), daemon=True,
                                            name="cadence-checkpoint")
            self._thread.start()

    def _write(self, step: int, files: dict[str, Any]) -> None:
        write_checkpoint(self.store.path(step), files, {"step": step})
        self.store.prune()

    def _write_together(self, step: int, files: dict[str, Any]) -> None:
        folder = self.store.path(step)
        tmp = temp_folder(folder, shared=True)
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.strategy.barrier()
        write_files(tmp, files)
        self.strategy.barrier()
        if self.strategy.is_main:
            commit(tmp, folder, entries_on_disk(tmp), {"step": step, "world_size": self.strategy.world_size})
            self.store.prune()
        self.strategy.barrier()

    def _write_catching(self, step: int, files: dict[str, Any]) -> None:
        try:
            self._write(step, files)
        except BaseException as err:  # reported by the next wait() in the training thread
            self._error = err

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
