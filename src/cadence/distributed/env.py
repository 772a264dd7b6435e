"""Who this process is, read from the variables torchrun (and ``accelerate launch``) set."""

from __future__ import annotations

import atexit
import datetime as dt
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def local_device(self) -> int | None:
        """The index of this process's accelerator on its machine: its local rank under torchrun, else None."""
        return self.local_rank if self.distributed else None


def read_env() -> DistEnv:
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> DistEnv:
    """Join the process group when launched by torchrun with more than one process (gloo on CPU, nccl on
    CUDA). A peer that dies or hangs makes every collective fail within ``timeout_s``, never hang forever."""
    env = read_env()
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
        atexit.register(_leave_process_group)
    return env


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter tears down: a group left to the C++ destructors at
    exit can abort the process ("terminate called without an active exception") after it trained well."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to release cleanly
            pass
        # gloo's worker threads drop their references to the last collectives' tensors a moment after those
        # are done, and dropping a tensor that Python has let go of takes the GIL; a thread asking for the GIL
        # once the interpreter finalizes is ended, which aborts the process. A short wait with the GIL released
        # lets them finish first (seen under load: about 1 exit in 10 aborted before it).
        time.sleep(0.02)
