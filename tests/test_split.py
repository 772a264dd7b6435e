"""Validation split: ``valid_frac`` by items or by groups, deterministic per ``split_seed``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from cadence.data.loading import as_in_memory
from cadence.data.split import split
from helpers import IndexedMLP, PairDataset, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def indexed(n: int):
    x, y = make_data(n)
    return x, y, torch.arange(n)


def val_ids(t) -> list[int]:
    """The ``idx`` column of a trainer's validation data (in memory or a Subset)."""
    mem = as_in_memory(t.val_data)
    if mem is not None:
        return mem.tensors[2].tolist()
    assert isinstance(t.val_data, Subset)
    return [int(t.val_data[i][2]) for i in range(len(t.val_data))]


def make(data, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("max_steps", 3)
    return trainer(IndexedMLP(), data, **kw)


@pytest.mark.parametrize("kind", ["in_memory", "map_style"])
def test_valid_frac_is_deterministic_per_split_seed(kind):
    def data():
        d = indexed(40)
        return PairDataset(*d) if kind == "map_style" else d

    a = val_ids(make(data(), valid_frac=0.25, split_seed=3))
    b = val_ids(make(data(), valid_frac=0.25, split_seed=3, seed=99))  # the training seed plays no part
    c = val_ids(make(data(), valid_frac=0.25, split_seed=4))
    assert a == b
    assert a != c
    assert len(a) == len(c) == 10
    # documented: the first round(N * valid_frac) of randperm(N) seeded with split_seed, in index order
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    assert a == sorted(perm[:10].tolist())


def test_valid_frac_rounds_and_keeps_the_rest_for_training():
    t = make(indexed(23), valid_frac=0.3, max_steps=None, max_epochs=1, split_seed=1)
    val = val_ids(t)
    assert len(val) == round(23 * 0.3) == 7
    t.fit()
    trained = torch.cat(t.model.seen).tolist()
    assert sorted(trained) == sorted(set(range(23)) - set(val))  # each training item once, no validation item


def test_validation_from_valid_frac_uses_the_held_out_items():
    x, y, idx = indexed(30)
    t = make((x, y, idx), valid_frac=0.2, split_seed=0)
    t.fit()
    val = val_ids(t)
    model = t.model
    assert sorted(torch.cat(model.seen_eval).tolist()) == val  # the validation at the end of fit()
    model.seen_eval.clear()
    metrics = t.validate()
    assert torch.cat(model.seen_eval).tolist() == val
    with torch.no_grad():
        per_item = torch.nn.functional.cross_entropy(model.logits(x[val]), y[val], reduction="none")
    assert metrics["val/loss"] == pytest.approx(per_item.mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["in_memory", "map_style"])
@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_split_by_puts_no_group_on_both_sides(kind, split_seed):
    n, n_groups = 60, 7
    data = indexed(n)
    if kind == "map_style":
        data = PairDataset(*data)

    def group(item):
        return int(item[2]) % n_groups

    t = make(data, valid_frac=0.3, split_by=group, split_seed=split_seed, max_steps=None, max_epochs=1)
    val = val_ids(t)
    val_groups = {i % n_groups for i in val}
    assert len(val_groups) == round(n_groups * 0.3) == 2
    # every item of a validation group is in validation, and nothing else is
    assert val == [i for i in range(n) if i % n_groups in val_groups]
    t.fit()
    train_groups = {i % n_groups for i in torch.cat(t.model.seen).tolist()}
    assert train_groups.isdisjoint(val_groups)
    assert train_groups | val_groups == set(range(n_groups))


def test_split_by_is_deterministic_per_split_seed():
    data = indexed(60)
    groups = [frozenset(i % 10 for i in val_ids(make(data, valid_frac=0.3, split_by=lambda it: int(it[2]) % 10,
                                                      split_seed=s))) for s in (0, 0, 1, 2, 3)]
    assert groups[0] == groups[1]
    assert len(set(groups[1:])) > 1  # another seed picks other groups


def test_split_unit_items_and_groups():
    data = as_in_memory(indexed(10))
    train, val = split(data, 0.3, seed=0)
    assert len(train) == 7 and len(val) == 3
    assert sorted(train.tensors[2].tolist() + val.tensors[2].tolist()) == list(range(10))
    # groups in order of first appearance, permuted by the seed
    labels = ["a", "b", "a", "c", "b", "d", "a", "c", "d", "b"]
    ds = PairDataset(torch.arange(10))
    train, val = split(ds, 0.5, seed=5, split_by=lambda item: labels[int(item[0])])
    order = torch.randperm(4, generator=torch.Generator().manual_seed(5))
    val_keys = {["a", "b", "c", "d"][j] for j in order[:2].tolist()}
    assert sorted(val.indices) == [i for i in range(10) if labels[i] in val_keys]
    assert sorted(train.indices) == [i for i in range(10) if labels[i] not in val_keys]


def test_split_by_unhashable_group():
    from cadence import ConfigError

    with pytest.raises(ConfigError, match=r"split_by=.*not hashable"):
        make(indexed(10), valid_frac=0.3, split_by=lambda item: [int(item[2])])
