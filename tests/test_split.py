"""Validation split: ``valid_frac`` by items or by groups, deterministic per ``split_seed``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from cadence.data.loading import as_in_memory
from cadence.data.split import split, split_indices
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


# ------------------------------------------------------------------------------------------------ split_mode
@pytest.mark.parametrize("n, frac, seed", [(8, 0.25, 0), (40, 0.1, 3), (23, 0.3, 7), (101, 0.5, 11), (64, 0.1, 0)])
def test_torch_mode_equals_random_split_exactly(n, frac, seed):
    """The same training and validation index lists as torch's random_split called as the seeds call it
    (``train = int((1 - f) * n)``, ``valid = n - train``), in the same order."""
    from torch.utils.data import random_split

    train_size = int((1 - frac) * n)
    k = n - train_size
    if (n, frac) == (64, 0.1):
        assert k == 7  # not int(0.1 * 64) = 6
    ref_train, ref_val = random_split(range(n), [train_size, k], generator=torch.Generator().manual_seed(seed))
    train, val = split_indices(PairDataset(torch.arange(n)), frac, seed, split_mode="torch")
    assert train == list(ref_train.indices) and val == list(ref_val.indices)
    assert val != sorted(val) or k < 3  # in random_split's order, not sorted
    # through the Trainer, in memory and map-style: the validation items in that order, training on the rest
    for data in (indexed(n), PairDataset(*indexed(n))):
        t = make(data, valid_frac=frac, split_seed=seed, split_mode="torch", max_steps=None, max_epochs=1)
        assert val_ids(t) == list(ref_val.indices)
        t.fit()
        assert sorted(torch.cat(t.model.seen).tolist()) == sorted(ref_train.indices)


def test_torch_mode_rounds_the_training_side_down_like_the_seeds():
    from cadence import ConfigError

    train, val = split_indices(PairDataset(torch.arange(64)), 0.1, 0, split_mode="torch")
    assert len(train) == int(0.9 * 64) == 57 and len(val) == 7  # int(0.1 * 64) would be 6
    train, val = split_indices(PairDataset(torch.arange(8)), 0.1, 0, split_mode="torch")
    assert len(train) == int(0.9 * 8) == 7 and len(val) == 1
    with pytest.raises(ConfigError, match="valid_frac=0.95.*no training"):
        split_indices(PairDataset(torch.arange(8)), 0.95, 0, split_mode="torch")  # int(0.05 * 8) = 0


def stratified_groups() -> list[str]:
    """Groups of 10, 5, 3 and 1 items, interleaved."""
    sizes = {"a": 10, "b": 5, "c": 3, "d": 1}
    labels = [g for g, m in sizes.items() for _ in range(m)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1)).tolist()
    return [labels[j] for j in order]


@pytest.mark.parametrize("split_seed", [0, 1])
def test_stratified_holds_out_the_fraction_of_every_group(split_seed):
    labels = stratified_groups()
    n, frac = len(labels), 0.3
    t = make(indexed(n), valid_frac=frac, split_by=labels, split_mode="stratified", split_seed=split_seed,
             max_steps=None, max_epochs=1)
    val = val_ids(t)
    assert val == sorted(val)
    for group in "abcd":
        members = [i for i in range(n) if labels[i] == group]
        held = [i for i in val if labels[i] == group]
        # documented: a group of m keeps int((1 - valid_frac) * m) for training (step-kit's count), the rest held
        assert len(held) == len(members) - int((1 - frac) * len(members)), group
    assert [len([i for i in val if labels[i] == g]) for g in "abcd"] == [3, 2, 1, 1]
    t.fit()
    assert sorted(torch.cat(t.model.seen).tolist()) == sorted(set(range(n)) - set(val))


def test_stratified_is_seeded_and_takes_a_callable_too():
    labels = stratified_groups()
    data = indexed(len(labels))
    by_list = [val_ids(make(data, valid_frac=0.3, split_by=labels, split_mode="stratified", split_seed=s))
               for s in (0, 0, 1)]
    by_callable = val_ids(make(data, valid_frac=0.3, split_by=lambda item: labels[int(item[2])],
                               split_mode="stratified", split_seed=0))
    assert by_list[0] == by_list[1] == by_callable
    assert by_list[0] != by_list[2]
    # the documented draw: one generator, one randperm per group in order of first appearance
    gen, expected = torch.Generator().manual_seed(0), []
    for group in dict.fromkeys(labels):
        members = [i for i, g in enumerate(labels) if g == group]
        perm = torch.randperm(len(members), generator=gen).tolist()
        expected += [members[j] for j in perm[int(0.7 * len(members)):]]
    assert by_list[0] == sorted(expected)


@pytest.mark.parametrize("as_kind", [list, tuple, torch.tensor, "numpy"])
def test_split_by_a_sequence_of_labels_equals_the_callable(as_kind):
    import numpy as np

    n, n_groups = 60, 7
    group_ids = [i % n_groups for i in range(n)]
    labels = np.array(group_ids) if as_kind == "numpy" else as_kind(group_ids)
    for mode in ("groups", "stratified"):
        given = val_ids(make(indexed(n), valid_frac=0.3, split_by=labels, split_mode=mode, split_seed=2))
        called = val_ids(make(indexed(n), valid_frac=0.3, split_by=lambda item: int(item[2]) % n_groups,
                              split_mode=mode, split_seed=2))
        assert given == called, mode
    # without split_mode, split_by means whole groups, as before split_mode existed
    default = val_ids(make(indexed(n), valid_frac=0.3, split_by=labels, split_seed=2))
    assert default == val_ids(make(indexed(n), valid_frac=0.3, split_by=labels, split_mode="groups", split_seed=2))
    assert len({i % n_groups for i in default}) == 2


def test_split_mode_misuse_is_refused():
    from cadence import ConfigError

    data, labels = indexed(20), [i % 4 for i in range(20)]
    with pytest.raises(ConfigError, match=r"split_by='a sequence of 19 labels'.*20 items"):
        make(data, valid_frac=0.3, split_by=labels[:19])
    with pytest.raises(ConfigError, match="split_mode='groups'.*split_by"):
        make(data, valid_frac=0.3, split_mode="groups")
    with pytest.raises(ConfigError, match="split_mode='torch'.*drop split_by"):
        make(data, valid_frac=0.3, split_by=labels, split_mode="torch")
    with pytest.raises(ConfigError, match="split_mode='shuffled'"):
        make(data, valid_frac=0.3, split_mode="shuffled")
    with pytest.raises(ConfigError, match="split_mode='torch'.*valid_frac"):
        make(data, split_mode="torch")
    with pytest.raises(ConfigError, match="split_by='abc'"):
        make(data, valid_frac=0.3, split_by="abc")


def test_the_cli_takes_labels_and_per_source_dicts():
    """From YAML/the command line: split_by as a list of labels, sampler and balance_by per source."""
    from cadence.cli.main import root_parser

    cfg = root_parser().parse_args([
        "fit", "--model", "cadence.demo.DigitsMLP", "--trainer.valid_frac", "0.2", "--trainer.split_mode",
        "stratified", "--trainer.split_by", "[a, b, a]", "--trainer.sampler", "{pos: balanced, neg: sequential}",
        "--trainer.balance_by", "{pos: [0, 1, 1]}"]).fit.trainer
    assert cfg.split_mode == "stratified" and cfg.split_by == ["a", "b", "a"]
    assert cfg.sampler == {"pos": "balanced", "neg": "sequential"} and cfg.balance_by == {"pos": [0, 1, 1]}
