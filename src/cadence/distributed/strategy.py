"""How the model is replicated or sharded and how ranks agree; one small class per engine.

The rest of cadence talks to a strategy only through these methods, and never asks which engine runs:

- ``wrap`` (the module the step calls) and ``no_sync`` (skip the gradient all-reduce on all but the last
  micro-batch);
- reductions: ``all_reduce`` (sum a tensor across ranks, no host read), ``mean`` (the same, divided by the
  number of ranks), ``any``/``max_values`` (read on the host: used where every rank must take the same branch),
  ``barrier``;
- weights and checkpoints: ``checkpoint_files``/``load_model_files``/``load_optimizer_files`` (the model's and
  the optimizer's files of a checkpoint: replicated, written once, or one shard per rank; any strategy loads a
  checkpoint of any other, at any world size, through :mod:`.reshard`), ``save_final`` (the whole weights at the
  end of a run) and ``checkpoint_weights`` (the whole weights of a checkpoint, for ``cadence export``).

A single process is a ``Strategy`` too: ``no_sync`` is a null context and every reduction the identity, so the
step and the loop have no single-process branches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.format import read_json, read_tensors
from ..checkpoint.state import load_local_shards, load_optimizer, local, optimizer_state
from ..errors import ConfigError, bad
from ..weights import clean_state_dict, load_model, save_weights, strip_compiled, write_safetensors
from . import reshard
from .env import DistEnv
from .reshard import SHARDS

STRATEGIES = ("auto", "single", "ddp", "fsdp")
_NOTHING = contextlib.nullcontext()  # reusable: it holds no state

Copier = Callable[[str], Callable[[str, torch.Tensor], torch.Tensor] | None]  # file -> its host copier, if any


class Strategy:
    """A single process: ``no_sync`` does nothing and every reduction is the identity."""

    name = "single"
    sharded = False  # each rank holds only a shard of the weights and of the optimizer state
    collective_forward = False  # every forward is a collective: a validation pass stops on all ranks at once
    writes_together = False  # several processes write each checkpoint into one folder
    find_unused_parameters = False  # DDP: let steps leave some parameters without a gradient

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        self.env, self.device = env, device

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def check(self, arguments: dict[str, Any]) -> None:
        """Refuse the ``Trainer`` arguments this strategy cannot do (yet)."""

    # ------------------------------------------------------------------------------------------- the step
    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return _NOTHING

    # ------------------------------------------------------------------------------------------- reductions
    def all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` reduced over the ranks with ``op`` (the sum), in place."""
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (a new tensor; no host read)."""
        return tensor

    def any(self, flag: bool) -> bool:
        return flag

    def max_values(self, values: list[float]) -> list[float]:
        return values

    def barrier(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------- weights
    def checkpoint_files(self, model: nn.Module, optimizer: torch.optim.Optimizer, copier: Copier) -> dict[str, Any]:
        """The model's and the optimizer's files of a checkpoint: replicated, so written once, by rank 0."""
        if not self.is_main:
            return {}
        weights = clean_state_dict(model, copier("model"))
        opt_tensors, opt_meta = optimizer_state(optimizer, copier("optimizer"))
        return {"model.safetensors": weights, "optimizer.safetensors": opt_tensors, "optimizer.json": opt_meta}

    def load_model_files(self, model: nn.Module, folder: Path, extra: dict[str, Any]) -> None:
        """Load a checkpoint's weights, with the modules' ``get_extra_state()`` (``extra``), as load_state_dict
        takes them (from an FSDP checkpoint: each tensor joined from its shards)."""
        if (folder / "model.safetensors").is_file():
            load_model(model, {**read_tensors(folder / "model.safetensors"), **extra}, str(folder))
            return
        saved = reshard.Saved(folder, "model", reshard.model_split(folder))
        load_model(model, {**{k: saved.whole(k) for k in saved.keys()}, **extra}, str(folder))

    def load_optimizer_files(self, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        if (folder / "optimizer.safetensors").is_file():
            load_optimizer(optimizer, read_tensors(folder / "optimizer.safetensors"),
                           read_json(folder / "optimizer.json"))
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        load_optimizer(optimizer, reshard.optimizer_tensors(folder, params, self.world_size, self.rank),
                       reshard.optimizer_json(folder))

    def save_final(self, model: nn.Module, folder: Path, ema_model: nn.Module | None = None) -> None:
        """``folder/model.safetensors`` (and ``ema.safetensors``), written by the main process."""
        if self.is_main:
            save_weights(model, folder / "model.safetensors")
            if ema_model is not None:
                save_weights(ema_model, folder / "ema.safetensors")

    @classmethod
    def checkpoint_weights(cls, folder: Path, file: str) -> Path | dict[str, torch.Tensor]:
        """The whole weights ``file`` of a checkpoint this strategy wrote: here a file to copy as it is."""
        return folder / file


class DDPStrategy(Strategy):
    """DistributedDataParallel: replicated weights, gradients averaged across ranks during backward."""

    name = "ddp"
    writes_together = True

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index if self.device.index is not None else self.env.local_rank] \
            if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=self.find_unused_parameters)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return model.no_sync()

    def all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=op)
        # Gloo's worker thread lets go of its own reference to the tensor a moment after the collective is done.
        # Were that the last one, dropping it would need the GIL; while the interpreter exits, a thread that asks
        # for the GIL is ended, and the process aborts ("terminate called without an active exception"). So the
        # strategy keeps the last reduced tensor alive (until the strategy itself goes).
        self._last_reduced = tensor
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(tensor.clone()) / self.world_size

    def any(self, flag: bool) -> bool:
        return self.max_values([1.0 if flag else 0.0])[0] > 0

    def max_values(self, values: list[float]) -> list[float]:
        """The largest of each value over all ranks (a host read: every rank must take the same branch)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce(t, op=dist.ReduceOp.MAX).tolist()

    def barrier(self) -> None:
        dist.barrier()




class FSDPStrategy(DDPStrategy):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded across ranks.

    Each rank saves its own shards (``model-rankNNNNN.safetensors``, ``optimizer-rankNNNNN.*``); rank 0 also
    writes ``model-shards.json``, from which :meth:`checkpoint_weights` puts the whole tensors back together.
    """

    name = "fsdp"
    sharded = True
    collective_forward = True

    def check(self, arguments: dict[str, Any]) -> None:
        if arguments["stages"]:
            raise bad("stages", "with strategy='fsdp'", "FSDP shards the parameters once; use strategy='ddp' "
                      "for staged training.")
        if arguments["ema"] is not None:
            raise bad("ema", arguments["ema"], "an EMA of FSDP-sharded weights is not supported yet; use "
                      "strategy='ddp'.")

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def _suffix(self) -> str:
        return f"-rank{self.rank:05d}"

    def checkpoint_files(self, model: nn.Module, optimizer: torch.optim.Optimizer, copier: Copier) -> dict[str, Any]:
        """Every rank writes its own shards of the weights and of the optimizer state."""
        opt_tensors, opt_meta = optimizer_state(optimizer)
        state = {strip_compiled(k): v for k, v in model.state_dict().items()}
        files: dict[str, Any] = {
            f"model{self._suffix()}.safetensors": {k: local(v).detach().to("cpu").clone() for k, v in state.items()},
            f"optimizer{self._suffix()}.safetensors": opt_tensors, f"optimizer{self._suffix()}.json": opt_meta}
        if self.is_main:
            sharded = {k: {"dim": _shard_dim(v), "shape": list(v.shape)} for k, v in state.items()
                       if _shard_dim(v) is not None}
            files[SHARDS] = {"world_size": self.world_size, "sharded": sharded}
        return files

    def _own_shards(self, folder: Path) -> bool:
        """Whether ``folder`` holds shards laid out for this world size (else they are read by slices)."""
        world = reshard.saved_world_size(folder)
        own = (folder / f"model{self._suffix()}.safetensors").is_file()
        return own and (world == self.world_size or (world is None and not (folder / "model.safetensors").is_file()))

    def load_model_files(self, model: nn.Module, folder: Path, extra: dict[str, Any]) -> None:
        """This rank's shards: its own file at the checkpoint's world size; at another one (or from whole
        tensors), its slice of each tensor, read from the files that hold it."""
        if self._own_shards(folder):
            load_local_shards(model, read_tensors(folder / f"model{self._suffix()}.safetensors"), str(folder))
            return
        saved = reshard.Saved(folder, "model", reshard.model_split(folder))
        own = {strip_compiled(k): v for k, v in model.state_dict().items()}
        missing = sorted(set(own) ^ set(saved.keys()))
        if missing:
            raise ConfigError(f"resume={str(folder)!r}: the checkpoint's tensors do not fit the model "
                              f"({', '.join(missing[:10])}); resume with the same model.")
        load_local_shards(model, {k: reshard.shard_of(saved, k, v, self.world_size, self.rank)
                                  for k, v in own.items()}, str(folder))

    def load_optimizer_files(self, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        if self._own_shards(folder):
            load_optimizer(optimizer, read_tensors(folder / f"optimizer{self._suffix()}.safetensors"),
                           read_json(folder / f"optimizer{self._suffix()}.json"))
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        load_optimizer(optimizer, reshard.optimizer_tensors(folder, params, self.world_size, self.rank),
                       reshard.optimizer_json(folder))

    def save_final(self, model: nn.Module, folder: Path, ema_model: nn.Module | None = None) -> None:
        """The whole tensors, gathered from the shards: every rank must call it (a collective)."""
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            write_safetensors({strip_compiled(k): v.detach().to("cpu").contiguous()
                               for k, v in full.items()}, folder / "model.safetensors")

    @classmethod
    def checkpoint_weights(cls, folder: Path, file: str) -> Path | dict[str, torch.Tensor]:
        """The whole weights, each sharded tensor joined from the ranks' shards in rank order."""
        if file != "model.safetensors" or not (folder / SHARDS).is_file():
            return folder / file  # (a checkpoint of cadence 0.x before model-shards.json: no whole weights)
        layout = read_json(folder / SHARDS)
        shards = [read_tensors(folder / f"model-rank{r:05d}.safetensors") for r in range(layout["world_size"])]
        out = {}
        for key, value in shards[0].items():
            spec = layout["sharded"].get(key)
            if spec is not None:
                value = torch.cat([s[key] for s in shards], dim=spec["dim"])
                if list(value.shape) != spec["shape"]:
                    raise ConfigError(f"{folder}: the shards of {key!r} join to {list(value.shape)}, not "
                                      f"{spec['shape']}; the checkpoint is not one cadence wrote.")
            out[key] = value.contiguous()
        return out


def _shard_dim(t: Any) -> int | None:
    """The dim a DTensor is sharded along (FSDP2 shards dim 0); None for a replicated tensor."""
    for placement in getattr(t, "placements", ()):
        if placement.is_shard():
            return placement.dim
    return None


def strategy_class(name: str | None) -> type[Strategy]:
    """The class of a strategy by its resolved name (a checkpoint's ``trainer.json``); a single process
    for a name it does not know (checkpoints saved before the name was recorded)."""
    classes: dict[str | None, type[Strategy]] = {"single": Strategy, "ddp": DDPStrategy, "fsdp": FSDPStrategy}
    return classes.get(name, Strategy)


def make_strategy(name: str, env: DistEnv, device: torch.device, find_unused_parameters: bool = False) -> Strategy:
    if name not in STRATEGIES:
        raise bad("strategy", name, f"use one of {', '.join(STRATEGIES)}.")
    if name == "auto":
        name = "ddp" if env.distributed else "single"
    if name != "single" and not env.distributed:
        raise bad("strategy", name, "this is a single process; launch with torchrun --nproc-per-node N "
                  "(or cadence fit --nproc N), or use strategy='single'.")
    if name == "single" and env.distributed:
        raise bad("strategy", name, f"torchrun started {env.world_size} processes; use 'ddp' or 'fsdp'.")
    strategy = strategy_class(name)(env, device)
    strategy.find_unused_parameters = find_unused_parameters
    return strategy
