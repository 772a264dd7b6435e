"""The strategy classes: a single process implements the same interface as DDP and FSDP (no_sync a null
context, every reduction the identity); a checkpoint names the strategy that wrote it (any strategy resumes it:
test_resize.py)."""

from __future__ import annotations

import torch

from cadence.distributed import DistEnv, make_strategy, strategy_class


def test_a_single_process_is_a_strategy_whose_every_operation_is_the_identity() -> None:
    single = make_strategy("auto", DistEnv(), torch.device("cpu"))
    model, t = torch.nn.Linear(2, 2), torch.arange(3.0)
    assert single.name == "single" and single.wrap(model) is model
    with single.no_sync(model):
        pass
    assert single.all_reduce(t) is t and torch.equal(single.mean(t), t)
    assert single.any(True) and not single.any(False) and single.max_values([1.0, 2.0]) == [1.0, 2.0]
    assert not (single.sharded or single.collective_forward or single.writes_together)


def test_a_checkpoint_names_its_strategy_and_an_unknown_name_is_a_single_process() -> None:
    assert strategy_class("fsdp").sharded and not strategy_class("ddp").sharded
    assert strategy_class(None).name == "single"
