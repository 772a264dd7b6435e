"""Resuming at another number of processes (docs/distributed.md, "Changing the number of processes").

Step ``i`` of an epoch takes the items ``perm[i * G:(i + 1) * G]`` with ``G = batch_size * grad_accum *
world_size``, however they are split among the ranks; so a checkpoint resumes exactly at any world size that
keeps ``G``. :func:`plan` compares the run's data arguments with the checkpoint's: where the world size changed
and the run was given the checkpoint's ``batch_size`` and ``grad_accum`` (as the run that wrote it was given
them: the checkpoint records both the argument and the ``grad_accum`` it trained with), it adapts ``grad_accum``
to keep ``G`` (said in one line);
where nothing keeps ``G``, it stops before anything is loaded or written, naming settings that would. An
explicit change of ``G`` needs ``new_global_batch=True``, which starts the data position over at the beginning
of an epoch.

The per-rank files map onto the new ranks: a rank's random generators are its own where the checkpoint has them,
else rank 0's (every rank is seeded alike, so without dropout they are what rank 0's are); every new rank's running
loss values are the mean over the old ranks' (the mean over ranks is what a log point reports, so it is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .format import read_tensors

if TYPE_CHECKING:
    from ..trainer import Trainer


@dataclass(frozen=True)
class Split:
    """How the global batch is made: ``batch_size`` items per micro-batch, ``grad_accum`` micro-batches per rank."""

    batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def __str__(self) -> str:
        return (f"{self.global_batch} (batch_size {self.batch_size} x grad_accum {self.grad_accum} x "
                f"{_processes(self.world_size)})")


@dataclass(frozen=True)
class Plan:
    """What a resume changes: the split it trains with (``grad_accum`` adapted or not) and whether the data
    position starts over (``new_global_batch``); ``message`` is the line said on stderr, if any."""

    saved: Split
    now: Split
    restart: bool = False
    message: str | None = None


def plan(trainer: Trainer, folder: Path, meta: dict[str, Any]) -> Plan:
    """Check the data arguments against the checkpoint's ``trainer.json`` (``meta``); raises ``ConfigError``."""
    where = f"resume={str(folder)!r}"
    now = Split(trainer.batch_size, trainer.grad_accum, trainer.world_size)
    fixed = {"data_length": trainer.data_length, "seed": trainer.seed}
    changed = [f"{k} {meta[k]} -> {v}" for k, v in {**fixed, **vars(now)}.items() if k in meta and meta[k] != v]
    if any(k in meta and meta[k] != v for k, v in fixed.items()):
        raise ConfigError(f"{where}: the run changed since this checkpoint ({'; '.join(changed)}); an exact resume "
                          "needs the same data and seed (and global batch). Put them back, or start a new run.")
    if not all(isinstance(meta.get(k), int) for k in ("batch_size", "grad_accum", "world_size")):
        return Plan(now, now)  # a checkpoint that did not record them (none of cadence's)
    saved = Split(meta["batch_size"], meta["grad_accum"], meta["world_size"])
    if saved == now:
        return Plan(saved, now)
    moved = f"{_processes(now.world_size)} from a checkpoint of {saved.world_size}"
    if now.global_batch == saved.global_batch:
        return _checked_streams(trainer, where, Plan(saved, now, message=(
            f"resume at {moved}: the global batch of {now} is kept" if now.world_size != saved.world_size else
            f"resume with the same global batch of {now}")))
    # batch_size and grad_accum as the run that wrote the checkpoint was given them (its grad_accum maybe adapted)
    untouched = now.batch_size == saved.batch_size and now.grad_accum == meta.get("grad_accum_given", saved.grad_accum)
    per_rank, rest = divmod(saved.global_batch, now.batch_size * now.world_size)
    if untouched and rest == 0 and per_rank >= 1:
        adapted = Split(now.batch_size, per_rank, now.world_size)
        kept = f"grad_accum {now.grad_accum} -> {per_rank} keeps the global batch of {adapted}"
        return _checked_streams(trainer, where, Plan(saved, adapted, message=(
            f"resume at {moved}: {kept}" if now.world_size != saved.world_size else f"resume: {kept}, as before")))
    if trainer.new_global_batch:
        return _checked_streams(trainer, where, Plan(saved, now, restart=True, message=(
            f"resume with new_global_batch=True: the global batch {saved.global_batch} -> {now}; the data "
            "position starts over at the beginning of an epoch")))
    raise ConfigError(
        f"{where}: the run changed since this checkpoint ({'; '.join(changed)}), so the global batch "
        f"would change from {saved} to {now}; an exact resume keeps it, since step i takes the items "
        f"[i*G, (i+1)*G) of the epoch's order. {keeping(saved.global_batch, now)} Or pass new_global_batch=True "
        "(--trainer.new_global_batch true) to train on with the new global batch, starting the data position over "
        "at the beginning of an epoch.")


def keeping(global_batch: int, now: Split) -> str:
    """Settings that keep ``global_batch`` at this world size, or the world sizes that can."""
    per_rank, rest = divmod(global_batch, now.world_size)
    if rest:
        sizes = [w for w in range(1, global_batch + 1) if global_batch % w == 0][:8]
        return (f"Its {global_batch} items do not split evenly among {_processes(now.world_size)}: resume at "
                f"{', '.join(map(str, sizes))} processes.")
    pairs = sorted(((b, per_rank // b) for b in range(1, per_rank + 1) if per_rank % b == 0),
                   key=lambda pair: (abs(pair[0] - now.batch_size), -pair[0]))[:3]
    options = " or ".join(f"batch_size={b} with grad_accum={a}" for b, a in pairs)
    return f"At {_processes(now.world_size)} it is kept by {options} (--trainer.batch_size, --trainer.grad_accum)."


def _checked_streams(trainer: Trainer, where: str, p: Plan) -> Plan:
    """A stream read as is (an iterable, a loader passed in) has a position per rank: it cannot be split."""
    if p.now.world_size == p.saved.world_size and p.now.grad_accum == p.saved.grad_accum and not p.restart:
        return p
    for name, stream in trainer.stream.streams.items():
        if stream.order is None:
            data = "train_data" if name is None else f"train_data[{name!r}]"
            raise ConfigError(
                f"{where}: {data} is an iterable or DataLoader read as is, whose position is its own, per rank "
                f"({p.saved.world_size} of them, grad_accum {p.saved.grad_accum}): it cannot be split among "
                f"{_processes(p.now.world_size)} with grad_accum {p.now.grad_accum}. Resume with the checkpoint's "
                f"world size and grad_accum ({p.saved.world_size}, {p.saved.grad_accum}), or train on a map-style "
                "dataset or tensors, whose items cadence places at any world size (the data order contract).")
    return p


def restart_position(data: dict[str, Any]) -> dict[str, Any]:
    """``new_global_batch``: the saved data position moved to the beginning of its next epoch (or of its epoch, if
    no step of it was taken): a position within an epoch counts steps of the old global batch."""
    def moved(s: dict[str, Any]) -> dict[str, Any]:
        ahead = int(s["position"]) > 0 or bool(s.get("end_of_epoch"))
        return {**s, "epoch": int(s["epoch"]) + int(ahead), "position": 0, "end_of_epoch": 0}

    if "sources" in data:
        return {**data, "sources": {n: moved(s) for n, s in data["sources"].items()}}
    return moved(data)


def rng_source(folder: Path, rank: int, saved_world_size: int) -> Path:
    """The random generators' file a rank resumes from: its own, else rank 0's."""
    if saved_world_size == 1:
        return folder / "rng.safetensors"
    own = folder / f"rng-rank{rank:05d}.safetensors"
    return own if rank < saved_world_size and own.exists() else folder / "rng-rank00000.safetensors"


def mean_running(folder: Path, saved_world_size: int) -> dict[str, torch.Tensor] | None:
    """The old ranks' running loss values since the last log point, averaged over the ranks (None: the checkpoint
    has only rank 0's, in ``trainer.json``)."""
    files = [folder / f"running-rank{r:05d}.safetensors" for r in range(saved_world_size)]
    if saved_world_size == 1 or not all(f.exists() for f in files):
        return None
    values = [read_tensors(f) for f in files]
    return {name: torch.stack([v[name] for v in values]).mean(0) for name in values[0]}


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"
