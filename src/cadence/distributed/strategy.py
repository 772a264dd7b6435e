"""How the model is replicated or sharded and how ranks agree; one small class per engine.

The trainer talks to a strategy only through: ``wrap`` (the module the step calls), ``no_sync`` (skip the
gradient all-reduce on all but the last micro-batch), ``all_reduce`` (sum a tensor across ranks, no host
read), ``any``/``max_values`` (read on the host: used where every rank must take the same branch), ``gather``
and ``barrier``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import bad
from .env import DistEnv

STRATEGIES = ("auto", "single", "ddp", "fsdp")


class Strategy:
    """A single process: every operation is the identity."""

    name = "single"

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

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        yield

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any(self, flag: bool) -> bool:
        return flag

    def max_values(self, values: list[float]) -> list[float]:
        return values

    def barrier(self) -> None:
        pass


class DDPStrategy(Strategy):
    """DistributedDataParallel: replicated weights, gradients averaged across ranks during backward."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index if self.device.index is not None else self.env.local_rank] \
            if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        with model.no_sync():
            yield

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        return self.max_values([1.0 if flag else 0.0])[0] > 0

    def max_values(self, values: list[float]) -> list[float]:
        """The largest of each value over all ranks (a host read: every rank must take the same branch)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()


class FSDPStrategy(DDPStrategy):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded across ranks."""

    name = "fsdp"

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


def make_strategy(name: str, env: DistEnv, device: torch.device) -> Strategy:
    if name not in STRATEGIES:
        raise bad("strategy", name, f"use one of {', '.join(STRATEGIES)}.")
    if name == "auto":
        name = "ddp" if env.distributed else "single"
    if name != "single" and not env.distributed:
        raise bad("strategy", name, "this is a single process; launch with torchrun --nproc-per-node N "
                  "(or cadence fit --nproc N), or use strategy='single'.")
    if name == "single" and env.distributed:
        raise bad("strategy", name, f"torchrun started {env.world_size} processes; use 'ddp' or 'fsdp'.")
    cls: Any = {"single": Strategy, "ddp": DDPStrategy, "fsdp": FSDPStrategy}[name]
    return cls(env, device)
