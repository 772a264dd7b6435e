"""Scaling out on torch.distributed: the process group from torchrun's environment, and one small strategy
per engine (single process, DDP, FSDP2)."""

from .env import DistEnv, init_distributed
from .strategy import Strategy, make_strategy, strategy_class

__all__ = ["DistEnv", "Strategy", "init_distributed", "make_strategy", "strategy_class"]
