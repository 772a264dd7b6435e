"""The data order contract: ``DataOrder`` itself, and the items every step of a ``Trainer`` really sees."""

from __future__ import annotations

import itertools
from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from cadence.data import loading
from cadence.data.order import DataOrder
from helpers import (
    MLP,
    IndexedMLP,
    PairDataset,
    assert_weights_changed,
    assert_weights_equal,
    clone,
    contract_batches,
    epoch_perm,
    make_data,
    trainer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_micro_batches(order: DataOrder, perm: torch.Tensor, step: int) -> list[torch.Tensor]:
    """The contract as documented, with no fast path: tensor_split by rank, then by micro-batch."""
    g = order.batch_size * order.grad_accum * order.world_size
    batch = perm[step * g:(step + 1) * g]
    mine = torch.tensor_split(batch, order.world_size)[order.rank]
    return [mb for mb in torch.tensor_split(mine, order.grad_accum) if len(mb)]


def as_lists(tensors: list[torch.Tensor]) -> list[list[int]]:
    return [t.tolist() for t in tensors]


# ----------------------------------------------------------------------------------------------- DataOrder
def test_permutation_is_the_contract():
    order = DataOrder(37, 4, seed=11)
    for epoch in range(3):
        assert torch.equal(order.permutation(epoch), epoch_perm(37, 11, epoch))
    assert not torch.equal(order.permutation(0), order.permutation(1))
    assert torch.equal(DataOrder(37, 4, seed=11, shuffle=False).permutation(5), torch.arange(37))


@pytest.mark.parametrize(
    "n,b,ga,ws,drop_last,steps",
    [(50, 16, 1, 1, False, 4), (50, 16, 1, 1, True, 3), (48, 16, 1, 1, False, 3), (48, 16, 1, 1, True, 3),
     (50, 4, 3, 1, False, 5), (50, 4, 3, 2, False, 3), (50, 4, 3, 2, True, 2), (5, 8, 1, 1, False, 1),
     (5, 8, 1, 1, True, 0)],
)
def test_steps_per_epoch(n, b, ga, ws, drop_last, steps):
    order = DataOrder(n, b, ga, world_size=ws, drop_last=drop_last)
    assert order.global_batch == b * ga * ws
    assert order.steps_per_epoch == steps


@pytest.mark.parametrize("n", [1, 12, 13, 23, 24, 50])
@pytest.mark.parametrize("b,ga,ws", [(2, 1, 1), (2, 3, 1), (3, 2, 2), (1, 4, 3), (4, 1, 2)])
def test_micro_batches_match_the_documented_contract(n, b, ga, ws):
    for rank in range(ws):
        order = DataOrder(n, b, ga, world_size=ws, rank=rank, seed=3)
        perm = order.permutation(0)
        for step in range(order.steps_per_epoch):
            got = order.micro_batches(perm, step)
            assert as_lists(got) == as_lists(reference_micro_batches(order, perm, step)), (rank, step)
            assert all(len(mb) <= b for mb in got)
        for drop_last in (False, True):  # the whole epoch at once, from any step: the same slices
            order = DataOrder(n, b, ga, world_size=ws, rank=rank, seed=3, drop_last=drop_last)
            for start in range(order.steps_per_epoch + 1):
                expected = [r for step in range(start, order.steps_per_epoch) for r in order.micro_ranges(step)]
                assert order.epoch_ranges(start) == expected, (rank, start, drop_last)


@pytest.mark.parametrize("n,b,ga,ws", [(50, 4, 3, 2), (23, 2, 3, 2), (13, 3, 2, 2), (17, 5, 1, 3)])
def test_ranks_and_micro_batches_tile_each_global_batch(n, b, ga, ws):
    """Across ranks and micro-batches every item of the epoch is seen exactly once, in perm order per step."""
    orders = [DataOrder(n, b, ga, world_size=ws, rank=r, seed=5) for r in range(ws)]
    perm = orders[0].permutation(2)
    seen: list[int] = []
    for step in range(orders[0].steps_per_epoch):
        step_items = [i for o in orders for mb in o.micro_batches(perm, step) for i in mb.tolist()]
        assert step_items == orders[0].global_indices(perm, step).tolist()
        seen += step_items
    assert seen == perm.tolist()


def test_micro_batches_full_and_partial_examples():
    perm = torch.arange(100, 123)  # 23 items with recognisable values
    order = DataOrder(23, batch_size=2, grad_accum=3, world_size=2, rank=1)
    # full global batch of 12: rank 1 takes items 6..11, as micro-batches of 2
    assert as_lists(order.micro_batches(perm, 0)) == [[106, 107], [108, 109], [110, 111]]
    # last global batch has 11 items: rank 0 takes the first 6, rank 1 the other 5, split 2, 2, 1
    assert as_lists(order.micro_batches(perm, 1)) == [[118, 119], [120, 121], [122]]
    rank0 = DataOrder(23, batch_size=2, grad_accum=3, world_size=2, rank=0)
    assert as_lists(rank0.micro_batches(perm, 1)) == [[112, 113], [114, 115], [116, 117]]
    # a single item left: empty pieces are skipped (rank 1 gets nothing)
    perm13 = torch.arange(13)
    assert as_lists(DataOrder(13, 2, 3, world_size=2, rank=0).micro_batches(perm13, 1)) == [[12]]
    assert DataOrder(13, 2, 3, world_size=2, rank=1).micro_batches(perm13, 1) == []


# ----------------------------------------------------------------------------------------------- in the Trainer
def indexed(n: int, seed: int = 0):
    x, y = make_data(n, seed)
    return x, y, torch.arange(n)


@pytest.mark.parametrize("grad_accum,drop_last", [(1, False), (1, True), (2, False), (3, False), (3, True)])
@pytest.mark.parametrize("kind", ["in_memory", "in_memory_by_batch", "map_style"])
def test_trainer_visits_items_in_contract_order(kind, grad_accum, drop_last, monkeypatch):
    n, b, seed, steps = 23, 3, 4, 7
    data = indexed(n)
    if kind == "map_style":
        data = PairDataset(*data)
    if kind == "in_memory_by_batch":  # data too large to gather per epoch: gathered micro-batch by micro-batch
        monkeypatch.setattr(loading, "GATHER_EPOCH_BYTES", 0)
    model = IndexedMLP()
    t = trainer(model, data, batch_size=b, grad_accum=grad_accum, max_steps=steps, seed=seed, drop_last=drop_last)
    t.fit()
    order = DataOrder(n, b, grad_accum, seed=seed, drop_last=drop_last)
    expected: list[torch.Tensor] = []
    for s in range(steps):
        epoch, step = divmod(s, order.steps_per_epoch)
        expected += reference_micro_batches(order, epoch_perm(n, seed, epoch), step)
    assert as_lists(model.seen) == as_lists(expected)
    assert t.step == steps


def test_map_style_and_in_memory_train_bitwise_equal():
    x, y = make_data(50)
    a, b = MLP(seed=3), MLP(seed=3)
    initial = clone(a)
    ds = PairDataset(x, y)
    kw = dict(batch_size=8, grad_accum=2, max_steps=11, lr=1e-2, max_grad_norm=0.5, seed=9)
    trainer(a, ds, **kw).fit()
    trainer(b, (x, y), **kw).fit()
    assert ds.calls > 0  # the map-style path really used __getitem__
    assert_weights_changed(initial, a)
    assert_weights_equal(a, b)


def test_tensor_dataset_is_indexed_in_memory():
    """A TensorDataset is batched by indexing its tensors: no per-item ``__getitem__``."""

    calls = {"n": 0}
    x, y = make_data(20)
    ds = TensorDataset(x, y)
    original = TensorDataset.__getitem__

    def counting(self, i):
        calls["n"] += 1
        return original(self, i)

    TensorDataset.__getitem__ = counting  # type: ignore[method-assign]
    try:
        trainer(MLP(), ds, batch_size=4, max_steps=5).fit()
    finally:
        TensorDataset.__getitem__ = original  # type: ignore[method-assign]
    assert calls["n"] == 0


def test_tensor_dataset_subclass_with_own_getitem_is_respected():
    class Noisy(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x * 0.0, y  # the subclass's own item transform

    x, y = make_data(20)
    model = MLP()
    seen_x: list[torch.Tensor] = []

    def forward(m, batch):
        seen_x.append(batch[0])
        return torch.nn.functional.cross_entropy(m.logits(batch[0]), batch[1])

    trainer(model, Noisy(x, y), batch_size=4, max_steps=2, forward=forward).fit()
    assert all(torch.count_nonzero(b) == 0 for b in seen_x)


def test_dataloader_is_used_as_is():
    data = indexed(23)
    loader = DataLoader(TensorDataset(*data), batch_size=5, shuffle=False)
    model = IndexedMLP()
    # batch_size and seed of the trainer play no part: the loader's own batches, in its own order
    t = trainer(model, loader, batch_size=2, max_steps=7, seed=123)
    assert t.steps_per_epoch == 5
    t.fit()
    expected = [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    assert as_lists(model.seen) == expected + expected[:2]  # the loader is iterated again for a new epoch


def test_shuffling_dataloader_keeps_its_own_order():
    data = indexed(20)
    loader = DataLoader(TensorDataset(*data), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    twin = DataLoader(TensorDataset(*data), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    model = IndexedMLP()
    trainer(model, loader, max_steps=10).fit()
    expected = [b[2] for b in itertools.chain(twin, twin)]
    assert as_lists(model.seen) == as_lists(expected)


def test_dataloader_with_grad_accum_takes_consecutive_batches():
    loader = DataLoader(TensorDataset(*indexed(25)), batch_size=5)
    model = IndexedMLP()
    events = []

    class Steps:
        def on_step_end(self, trainer):
            events.append(len(model.seen))

    t = trainer(model, loader, grad_accum=2, max_epochs=1, callbacks=[Steps()])
    assert t.max_steps == 3
    t.fit()
    assert t.step == 3
    assert events == [2, 4, 5]  # two micro-batches per step, the last step takes the one left
    assert sorted(i for mb in as_lists(model.seen) for i in mb) == list(range(25))


def test_max_epochs_counts_epochs_in_memory():
    n = 20
    model = IndexedMLP()
    t = trainer(model, indexed(n), batch_size=8, max_epochs=3, seed=2)
    t.fit()
    assert t.step == 9  # 3 steps per epoch (8, 8, 4)
    items = torch.cat(model.seen)
    assert torch.equal(items.bincount(minlength=n), torch.full((n,), 3))
    expected = torch.cat([epoch_perm(n, 2, e) for e in range(3)])
    assert torch.equal(items, expected)
    # step 1 is a log point (the first record comes at once), then the end of the run
    assert [(r["step"], r["epoch"]) for r in t.history if r["split"] == "train"] == [(1, 0), (9, 2)]


def test_max_epochs_counts_epochs_with_a_dataloader():
    loader = DataLoader(TensorDataset(*indexed(20)), batch_size=6)
    model = IndexedMLP()
    t = trainer(model, loader, max_epochs=2)
    t.fit()
    assert t.step == 8
    assert torch.equal(torch.cat(model.seen).bincount(), torch.full((20,), 2))


def test_max_epochs_counts_epochs_with_an_iterable_without_length():
    class Batches:
        """Re-iterable, no ``__len__``: the epoch ends when an iteration does."""

        def __iter__(self):
            x, y, idx = indexed(12)
            return iter([(x[i:i + 4], y[i:i + 4], idx[i:i + 4]) for i in range(0, 12, 4)])

    model = IndexedMLP()
    t = trainer(model, Batches(), max_epochs=2)
    assert t.max_steps is None
    t.fit()
    assert t.step == 6
    assert torch.equal(torch.cat(model.seen).bincount(), torch.full((12,), 2))


def test_max_steps_and_max_epochs_stop_at_the_first_reached():
    t = trainer(MLP(), make_data(20), batch_size=8, max_epochs=3, max_steps=5)
    t.fit()
    assert t.step == 5
    u = trainer(MLP(), make_data(20), batch_size=8, max_epochs=1, max_steps=50)
    u.fit()
    assert u.step == 3


def test_drop_last_skips_the_partial_batch():
    model = IndexedMLP()
    t = trainer(model, indexed(20), batch_size=8, max_epochs=2, drop_last=True, seed=1)
    t.fit()
    assert t.step == 4
    assert [len(s) for s in model.seen] == [8] * 4
    assert as_lists(model.seen) == as_lists(contract_batches(20, 8, 1, 4, drop_last=True))


def test_shuffle_false_visits_in_dataset_order():
    model = IndexedMLP()
    trainer(model, indexed(10), batch_size=4, max_steps=4, shuffle=False).fit()
    assert as_lists(model.seen) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_dataset_smaller_than_a_batch_makes_one_partial_step_per_epoch():
    model = IndexedMLP()
    t = trainer(model, indexed(5), batch_size=8, max_epochs=2, seed=3)
    assert t.steps_per_epoch == 1
    t.fit()
    assert t.step == 2
    assert as_lists(model.seen) == [epoch_perm(5, 3, 0).tolist(), epoch_perm(5, 3, 1).tolist()]


def test_stack_items_collates_as_default_collate():
    """The main process's collation of tensors and tuples of tensors gives what default_collate gives; other
    items (dicts, numbers, named tuples, tuples of unequal length) go to default_collate itself."""
    x = torch.randn(5, 3)
    Pair = namedtuple("Pair", "x y")
    for items in ([x[i] for i in range(5)], [(x[i], torch.tensor(i)) for i in range(5)],
                  [{"x": x[i], "y": i} for i in range(5)], [(x[i], i) for i in range(5)],
                  [Pair(x[i], torch.tensor(i)) for i in range(5)], [(x[i], x[i].long()) for i in range(5)]):
        got, want = loading.stack_items(items), default_collate(items)
        assert type(got) is type(want)
        flat = (lambda b: list(b.values()) if isinstance(b, dict) else b if isinstance(b, (list, tuple)) else [b])
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(flat(got), flat(want)))
    with pytest.raises(RuntimeError, match="equal size"):
        loading.stack_items([(x[0], x[0]), (x[1],)])
