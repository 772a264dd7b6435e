"""Random draws in the data pipeline resume exactly: no step is built ahead of its checkpoint, and items are
seeded from (seed, epoch, index) (data/seeding.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from cadence.data.seeding import item_seed, seed_generators
from helpers import IN, MLP, CrashAt, assert_weights_equal, make_data, trainer

N = 40
MAX_STEPS = 10


class Augmented(Dataset):
    """``x[i]`` plus noise from ``random``, numpy and torch, the three generators an augmentation draws from."""

    def __init__(self, n: int = N) -> None:
        self.x, self.y = make_data(n, seed=3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = random.random() + float(np.random.rand()) + torch.rand(IN)
        return self.x[i] + noise, self.y[i]


class Plain(Augmented):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def noisy_collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = default_collate(items)
    return x + torch.rand(x.shape) * 0.1 + random.random(), y


class DropoutMLP(MLP):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.cross_entropy(self.net(self.drop(x)), y)


class Batches:
    """Records every training batch the model sees."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        model.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].clone()) if m.training else None)


SOURCES = {
    "getitem": dict(dataset=Augmented, collate=None, model=lambda: MLP(seed=0)),
    "collate": dict(dataset=Plain, collate=noisy_collate, model=lambda: MLP(seed=0)),
    "model": dict(dataset=Plain, collate=None, model=DropoutMLP),
}


def run(tmp_path, source: str, *, crash_at: int | None = None, resume: bool = False, **kw):
    spec = SOURCES[source]
    model = spec["model"]()
    seen = Batches(model)
    callbacks = [CrashAt(crash_at)] if crash_at is not None else []
    t = trainer(model, spec["dataset"](), batch_size=4, max_steps=MAX_STEPS, collate_fn=spec["collate"],
                run_dir=tmp_path, checkpoint_every=2, callbacks=callbacks, resume="auto" if resume else None,
                **kw)
    if crash_at is None:
        t.fit()
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            t.fit()
    return model, seen.seen


@pytest.mark.parametrize("item_seeding", [True, False], ids=["item-seeding", "no-item-seeding"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_random_draws_resume_bitwise_without_workers(tmp_path, source, item_seeding):
    """The issue's reproduction: checkpoint every 2 steps, crash after step 5 (resumes from 4), resume to 10."""
    whole, whole_seen = run(tmp_path / "whole", source, item_seeding=item_seeding)
    run(tmp_path / "cut", source, crash_at=5, item_seeding=item_seeding)
    resumed, resumed_seen = run(tmp_path / "cut", source, resume=True, item_seeding=item_seeding)
    # the resumed step 5 sees the uninterrupted step 5's batch, not step 6's
    assert len(resumed_seen) == MAX_STEPS - 4
    for a, b in zip(resumed_seen, whole_seen[4:]):
        assert torch.equal(a, b)
    assert_weights_equal(resumed, whole)


@pytest.mark.parametrize("source", ["getitem", "collate"])
def test_random_draws_resume_bitwise_with_workers(tmp_path, source):
    whole, _ = run(tmp_path / "whole", source, num_workers=2)
    run(tmp_path / "cut", source, crash_at=5, num_workers=2)
    resumed, _ = run(tmp_path / "cut", source, resume=True, num_workers=2)
    assert_weights_equal(resumed, whole)


def test_item_draws_do_not_depend_on_workers(tmp_path):
    """With item seeding, 0 and 2 workers give the same batches (and weights)."""
    a, seen_a = run(tmp_path / "a", "getitem", num_workers=0)
    b, seen_b = run(tmp_path / "b", "getitem", num_workers=2)
    assert all(torch.equal(x, y) for x, y in zip(seen_a, seen_b)) and len(seen_a) == len(seen_b) == MAX_STEPS
    assert_weights_equal(a, b)


def test_item_draws_follow_the_documented_formula():
    """Item ``i`` of epoch ``e`` draws what the generators give right after ``seed_generators(item_seed(...))``."""
    data = Augmented()
    model = MLP(seed=0)
    seen = Batches(model)
    trainer(model, data, batch_size=4, max_steps=12, seed=7, shuffle=False).fit()  # 10 steps per epoch
    for step, epoch, first in [(0, 0, 0), (11, 1, 4)]:
        seed_generators(item_seed(7, epoch, first))
        assert torch.equal(seen.seen[step][0], data[first][0])


def test_item_seeding_leaves_the_models_random_stream_alone():
    """In the main process the generators are put back after each micro-batch's items: the dropout masks of a
    run whose dataset draws are the same as those of a run whose dataset draws nothing."""
    masks = []
    for dataset in (Augmented(), Plain()):
        model = DropoutMLP()
        drawn: list[torch.Tensor] = []
        model.drop.register_forward_hook(lambda m, args, out, drawn=drawn: drawn.append((out == 0).clone()))
        trainer(model, dataset, batch_size=4, max_steps=3).fit()
        masks.append(drawn)
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_without_item_seeding_the_dataset_draws_from_the_global_stream():
    torch.manual_seed(0)
    data = Augmented()
    model = MLP(seed=0)
    seen = Batches(model)
    trainer(model, data, batch_size=4, max_steps=1, seed=7, shuffle=False, item_seeding=False).fit()
    seed_generators(item_seed(7, 0, 0))
    assert not torch.equal(seen.seen[0][0], data[0][0])
