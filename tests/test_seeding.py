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

from cadence import Callback
from cadence.data import seeding
from cadence.data.seeding import SeededItems, item_seed, item_seeds, seed_generators
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


# ------------------------------------------------------------------------------------------------ lazy seeding
def test_item_seeds_of_a_micro_batch_are_the_item_seeds():
    indices = [0, 1, 5, 17, 2**31 + 3, 2**40 + 11]
    for seed, epoch in [(0, 0), (7, 3), (2**40 + 5, 1)]:
        assert item_seeds(seed, epoch, indices) == [item_seed(seed, epoch, i) for i in indices]


DRAWS = {  # a draw, and one that takes a cached normal only
    "random": (random.random, random.gauss),
    "numpy": (np.random.rand, np.random.randn),
    "torch": (lambda: torch.rand(1), lambda: torch.randn(1)),
}


@pytest.mark.parametrize("name", list(DRAWS))
def test_a_watched_generator_sees_every_draw_and_is_put_back_exactly(name):
    """Its mark and its state change with a plain draw, with a normal taken from the cache, and after a whole
    refill (624 words later the position is the same again); putting the state back gives the same draws."""
    gen = dict(zip(DRAWS, seeding._generators()))[name]
    draw, normal = DRAWS[name]

    def read() -> tuple:
        return gen.mark(), gen.state()

    seed_generators(1)
    before = read()
    assert read() == before  # reading draws nothing
    draw()
    after = read()
    assert after[0] != before[0] and after[1] != before[1]
    normal()  # two normals made, one cached
    cached = read()
    normal()  # the cached one: no word drawn
    assert all(a != b for a, b in zip(read(), cached))
    seed_generators(2)
    start = read()
    if name == "random":
        random.getrandbits(32 * 624)
    elif name == "numpy":
        np.random.randint(0, 2**32, size=624, dtype=np.uint64)
    else:
        torch.randint(0, 2**31, (624,))
    assert all(a != b for a, b in zip(read(), start))
    gen.put_back(before[1])
    assert read() == before
    first = [float(draw()) for _ in range(3)]
    gen.put_back(before[1])
    assert [float(draw()) for _ in range(3)] == first


class Draws(Dataset):
    """Item ``i`` adds noise from ``random`` (``i % 4 == 0``), numpy (``1``), torch (``2``) or nothing (``3``); with
    ``start_epoch``, only once ``epoch`` (set by the callback below) reaches it."""

    def __init__(self, n: int = N, start_epoch: int = 0) -> None:
        self.x, self.y = make_data(n, seed=3)
        self.start_epoch, self.epoch = start_epoch, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.epoch < self.start_epoch:
            return self.x[i], self.y[i]
        kind = i % 4
        noise = random.random() if kind == 0 else float(np.random.rand()) if kind == 1 else 0.0
        return self.x[i] + noise + (torch.rand(IN) if kind == 2 else 0.0), self.y[i]


class EpochToData(Callback):
    """Tells the dataset the epoch about to start (the number of epochs started before it)."""

    def __init__(self, data: Draws) -> None:
        self.data, self.data.epoch = data, -1

    def on_epoch_start(self, trainer) -> None:
        self.data.epoch += 1


def expected(data: Draws, seed: int, epoch: int, index: int) -> torch.Tensor:
    data.epoch = epoch
    seed_generators(item_seed(seed, epoch, index))
    return data[index][0]


@pytest.mark.parametrize("start_epoch", [0, 1], ids=["from-the-start", "from-epoch-1"])
def test_items_that_draw_from_different_generators_or_start_late_follow_the_formula(start_epoch):
    """Each item draws what it would after seeding all three generators, whichever generator it draws from and
    whenever it starts; the dropout masks of the model are those of a run whose dataset draws nothing."""
    runs = []
    for data in (Draws(start_epoch=start_epoch), Plain()):
        model = DropoutMLP()
        seen = Batches(model)
        masks: list[torch.Tensor] = []
        model.drop.register_forward_hook(lambda m, args, out, masks=masks: masks.append((out == 0).clone()))
        callbacks = [EpochToData(data)] if isinstance(data, Draws) else []
        trainer(model, data, batch_size=4, max_steps=25, seed=5, callbacks=callbacks).fit()  # 10 steps an epoch
        runs.append((seen.seen, masks))
    (seen, masks), (_, plain_masks) = runs
    assert all(torch.equal(a, b) for a, b in zip(masks, plain_masks)) and len(masks) == 25
    data = Draws(start_epoch=start_epoch)
    for step in range(25):
        epoch, k = divmod(step, 10)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(5 + epoch))[4 * k:4 * k + 4].tolist()
        assert torch.equal(seen[step], torch.stack([expected(data, 5, epoch, i) for i in perm])), step


@pytest.fixture
def official_state_calls(monkeypatch):
    """The generators watched through their official state calls (``getstate``/``get_state``), as on a Python,
    numpy or torch whose memory layout is not the one checked for."""
    from cadence.data import seeding

    python, numpy, torch_ = (object.__new__(c) for c in (seeding._Python, seeding._Numpy, seeding._Torch))
    python.words, numpy.cache, torch_.region = None, None, None
    monkeypatch.setattr(seeding, "_GENERATORS", (python, numpy, torch_))


def test_without_the_memory_layout_the_official_state_calls_give_the_same_items(official_state_calls):
    test_items_that_draw_from_different_generators_or_start_late_follow_the_formula(1)


def test_items_that_draw_from_different_generators_are_the_same_with_workers_and_resume(tmp_path):
    def fit(run_dir, **kw):
        model = MLP(seed=0)
        seen = Batches(model)
        trainer(model, Draws(), batch_size=4, max_steps=MAX_STEPS, run_dir=run_dir, checkpoint_every=2, **kw).fit()
        return model, seen.seen

    whole, seen = fit(tmp_path / "a")
    workers, seen_workers = fit(tmp_path / "b", num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(seen, seen_workers)) and len(seen_workers) == MAX_STEPS
    assert_weights_equal(whole, workers)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "c", callbacks=[CrashAt(5)])
    resumed, seen_resumed = fit(tmp_path / "c", resume="auto")
    assert all(torch.equal(a, b) for a, b in zip(seen_resumed, seen[4:])) and len(seen_resumed) == MAX_STEPS - 4
    assert_weights_equal(resumed, whole)


@pytest.mark.parametrize("name", list(DRAWS))
def test_a_normal_taken_from_the_cache_is_seen(name):
    """A micro-batch whose only draw is one cached normal (left by the model's draws) still gets the item's
    seeded normal, and the model's cached normal is there again afterwards."""
    normal = DRAWS[name][1]

    class OneNormal(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> float:
            return float(normal()) if i == 3 else 0.0

    items = SeededItems(OneNormal(), seed=0, per_item=True)
    seed_generators(9)
    normal()  # two made, one left in the cache
    model_next = float(normal())
    seed_generators(9)
    normal()
    got = items.__getitems__((0, 0, [2, 3]))
    assert float(normal()) == model_next
    seed_generators(item_seed(0, 0, 3))
    assert got == [0.0, float(normal())]


class OwnGenerator(Plain):
    """Draws from a torch.Generator of its own, which cadence neither seeds nor touches."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(11)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + torch.rand(IN, generator=self.gen), self.y[i]


def test_a_datasets_own_generator_goes_on_from_item_to_item_and_is_read_once():
    data = OwnGenerator()
    model = MLP(seed=0)
    seen = Batches(model)
    trainer(model, data, batch_size=4, max_steps=3, seed=2).fit()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:12].tolist()
    replay = OwnGenerator()
    assert torch.equal(torch.cat(seen.seen), torch.stack([replay[i][0] for i in order]))
