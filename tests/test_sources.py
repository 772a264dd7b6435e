"""Several training sources (mix="each" equal to a hand-written loop, mix="sample" seeded and by weight, each
source its own position, bad sources refused, exact resume) and balanced sampling (by a callable or by labels
given one per item, per source with {"source": value})."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cadence import ConfigError, Trainer
from helpers import MLP, CrashAt, IndexedMLP, contract_batches, make_data

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE_SEED_STRIDE = 1_000_003  # source i (in dict order) follows the data order contract with seed + i * this


class PartsMLP(MLP):
    """Cross-entropy loss, plus a part: the mean top logit (not trained on)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "top": logits.max(1).values.mean()}


class Items(Dataset):
    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.tensors)


def build(model: nn.Module, data: Any, **kw: Any) -> Trainer:
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return Trainer(model, data, **kw)


# ------------------------------------------------------------------------------------------------ mix="each"
def test_mix_each_equals_a_hand_written_multi_source_loop():
    seed, steps, batch = 3, 8, 4
    sources = {"pos": make_data(20, seed=1), "neg": make_data(12, seed=2)}  # 5 and 3 steps per epoch
    weights = {"pos": 1.0, "neg": 0.5}
    model = PartsMLP()
    start = copy.deepcopy(model)
    t = build(model, sources, mix="each", source_weights=weights, batch_size=batch, max_steps=steps, lr=0.1,
              optimizer="sgd", seed=seed, log_every=1)
    t.fit()

    hand = start
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    order = {name: contract_batches(len(x), batch, seed + SOURCE_SEED_STRIDE * i, steps)
             for i, (name, (x, _)) in enumerate(sources.items())}
    expected_records = []
    for step in range(steps):
        total, record = 0.0, {}
        for name, (x, y) in sources.items():
            idx = order[name][step]
            out = hand(x[idx], y[idx])
            total = total + weights[name] * out["loss"]
            record[f"{name}/loss"], record[f"{name}/top"] = out["loss"].item(), out["top"].item()
        total.backward()
        opt.step()
        opt.zero_grad()
        expected_records.append((total.item(), record))

    for k, v in hand.state_dict().items():
        torch.testing.assert_close(t.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # per-source parts and losses are logged as "<source>/<part>", the total as the weighted sum
    train = [r for r in t.history if r["split"] == "train" and "event" not in r]
    assert len(train) == steps
    for r, (total, parts) in zip(train, expected_records):
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        assert r["parts"].keys() == parts.keys()
        for k, v in parts.items():
            assert r["parts"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert len(t.history["train/pos/loss"]) == steps


def test_mix_each_with_grad_accum_and_a_map_style_source():
    x1, y1 = make_data(16, seed=1)
    x2, y2 = make_data(10, seed=2)
    model = MLP()
    start = copy.deepcopy(model)
    t = build(model, {"a": (x1, y1), "b": Items(x2, y2)}, mix="each", batch_size=2, grad_accum=2, max_steps=5,
              lr=0.1, optimizer="sgd", seed=0)
    t.fit()
    hand = start
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    order = {"a": contract_batches(16, 4, 0, 5), "b": contract_batches(10, 4, SOURCE_SEED_STRIDE, 5)}
    for step in range(5):
        total = 0.0
        for name, (x, y) in (("a", (x1, y1)), ("b", (x2, y2))):
            idx = order[name][step]  # a source's mean over its step, micro-batches included
            total = total + hand(x[idx], y[idx])
        total.backward()
        opt.step()
        opt.zero_grad()
    for k, v in hand.state_dict().items():
        torch.testing.assert_close(t.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------ mix="sample"
def two_indexed_sources(n_a: int = 8, n_b: int = 12) -> dict[str, tuple[torch.Tensor, ...]]:
    """Source b's item ids start at 1000, so the recorded ids say which source a batch came from."""
    xa, ya = make_data(n_a, seed=1)
    xb, yb = make_data(n_b, seed=2)
    return {"a": (xa, ya, torch.arange(n_a)), "b": (xb, yb, 1000 + torch.arange(n_b))}


def sampled(seed: int, steps: int = 200, weights: dict[str, float] | None = None) -> list[torch.Tensor]:
    model = IndexedMLP()
    build(model, two_indexed_sources(), mix="sample", source_weights=weights or {"a": 3.0, "b": 1.0},
          batch_size=4, max_steps=steps, seed=seed, log_every=100).fit()
    return model.seen


def test_mix_sample_picks_sources_by_weight_reproducibly():
    seen = sampled(seed=0)
    picks = ["a" if int(b[0]) < 1000 else "b" for b in seen]
    assert all((b < 1000).all() or (b >= 1000).all() for b in seen)  # one source per step
    assert len(picks) == 200
    count = Counter(picks)
    assert 130 <= count["a"] <= 170  # weight 3:1 -> 150 expected (sd 6.1); deterministic for this seed
    again = sampled(seed=0)
    assert all(torch.equal(u, v) for u, v in zip(seen, again))
    other = sampled(seed=1)
    assert [int(b[0]) < 1000 for b in other] != [int(b[0]) < 1000 for b in seen]


def test_mix_sample_each_source_keeps_its_own_position():
    seen = sampled(seed=5, steps=40, weights={"a": 1.0, "b": 1.0})
    from_a = [b for b in seen if int(b[0]) < 1000]
    from_b = [b - 1000 for b in seen if int(b[0]) >= 1000]
    assert from_a and from_b
    # each source walks through its own epochs under the contract, however the draws interleave
    expected_a = contract_batches(8, 4, 5, len(from_a))
    expected_b = contract_batches(12, 4, 5 + SOURCE_SEED_STRIDE, len(from_b))
    assert all(torch.equal(u, v) for u, v in zip(from_a, expected_a))
    assert all(torch.equal(u, v) for u, v in zip(from_b, expected_b))


def test_mix_sample_logs_the_drawn_source():
    t = build(PartsMLP(), {"a": make_data(8, seed=1), "b": make_data(8, seed=2)}, mix="sample", batch_size=4,
              max_steps=12, log_every=1)
    t.fit()
    for r in t.history:
        if r["split"] == "train":
            sources = {k.split("/")[0] for k in r["parts"]}
            assert len(sources) == 1 and r["parts"].keys() == {f"{s}/{p}" for s in sources for p in ("loss", "top")}
            (name,) = sources
            assert r["loss"] == pytest.approx(r["parts"][f"{name}/loss"], rel=1e-6)  # drawn: weight 1


# ------------------------------------------------------------------------------------------------ bad sources
def test_bad_sources_are_refused():
    a, b = make_data(8, seed=1), make_data(8, seed=2)
    for weights in ({"a": 0.0, "b": 1.0}, {"a": -1.0, "b": 1.0}):
        for mix in ("each", "sample"):
            with pytest.raises(ConfigError, match="source_weights.*'a'"):
                build(MLP(), {"a": a, "b": b}, mix=mix, source_weights=weights, max_steps=2)
    with pytest.raises(ConfigError, match="not sources"):
        build(MLP(), {"a": a, "b": b}, source_weights={"c": 1.0}, max_steps=2)
    empty = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"train_data\['b'\].*empty"):
        build(MLP(), {"a": a, "b": empty}, mix="each", max_steps=2)
    with pytest.raises(ConfigError, match=r"train_data\['b'\].*empty"):
        build(MLP(), {"a": a, "b": Items(*empty)}, max_steps=2)
    with pytest.raises(ConfigError, match="mix"):
        build(MLP(), {"a": a, "b": b}, mix="round-robin", max_steps=2)
    with pytest.raises(ConfigError, match="mix"):
        build(MLP(), a, mix="each", max_steps=2)  # one source
    with pytest.raises(ConfigError, match="max_epochs"):
        build(MLP(), {"a": a, "b": b}, max_epochs=1)
    with pytest.raises(ConfigError, match="valid_frac"):
        build(MLP(), {"a": a, "b": b}, valid_frac=0.25, max_steps=2)


# ------------------------------------------------------------------------------------------------ resume


def assert_resumes_exactly(tmp_path: Path, make: Any, crash_at: int) -> tuple[Trainer, Trainer]:
    reference = make(tmp_path / "ref")
    reference.fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path / "run", callbacks=[CrashAt(crash_at)]).fit()
    resumed = make(tmp_path / "run", resume="auto")
    resumed.fit()
    assert resumed.step == reference.step
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    return reference, resumed


@pytest.mark.parametrize("mix", ["each", "sample"])
def test_two_sources_resume_exactly(tmp_path, mix):
    def make(run: Path, **kw: Any) -> Trainer:
        data = two_indexed_sources()
        data["b"] = Items(*data["b"])  # one in-memory source, one map-style
        return build(IndexedMLP(), data, mix=mix, source_weights={"a": 2.0, "b": 1.0}, batch_size=4, max_steps=11,
                     seed=7, run_dir=run, checkpoint_every=4, lr=0.05, schedule="cosine", log_every=3, **kw)

    reference, resumed = assert_resumes_exactly(tmp_path, make, crash_at=6)
    # the resumed run drew exactly the batches the reference drew from step 4 on
    tail = reference.model.seen[-len(resumed.model.seen):]
    assert len(resumed.model.seen) == 7 * (2 if mix == "each" else 1)
    assert all(torch.equal(u, v) for u, v in zip(tail, resumed.model.seen))


# ------------------------------------------------------------------------------------------------ balanced sampling
def imbalanced(n: int = 100, rare: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, _ = make_data(n, seed=4)
    y = torch.zeros(n, dtype=torch.long)
    y[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:rare]] = 1
    return x, y, torch.arange(n)


def label_of(item: Any) -> int:
    return int(item[1])


def balanced_draws(seed: int, data: Any = None, epochs: int = 1, balance_by: Any = label_of,
                   ) -> tuple[list[torch.Tensor], Trainer]:
    model = IndexedMLP()
    t = build(model, data if data is not None else imbalanced(), sampler="balanced", balance_by=balance_by,
              batch_size=10, max_epochs=epochs, seed=seed)
    t.fit()
    return model.seen, t


def test_balanced_sampling_draws_labels_about_equally():
    x, y, _ = imbalanced()
    assert Counter(y.tolist()) == {0: 90, 1: 10}
    seen, t = balanced_draws(seed=0)
    assert t.steps_per_epoch == 10 and len(seen) == 10
    drawn = torch.cat(seen)
    assert len(drawn) == 100  # one epoch: as many draws as items
    rare = int(y[drawn].sum())
    assert 35 <= rare <= 65  # about half, not about 10
    # the draws are the documented ones: N draws with replacement by weight 1 / count(label), seeded seed + epoch
    weights = torch.tensor([1 / 90 if int(label) == 0 else 1 / 10 for label in y], dtype=torch.float64)
    expected = torch.multinomial(weights, 100, replacement=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, expected)


def test_balanced_sampling_is_seeded_per_epoch():
    seen, _ = balanced_draws(seed=0, epochs=2)
    again, _ = balanced_draws(seed=0, epochs=2)
    other, _ = balanced_draws(seed=1, epochs=1)
    assert all(torch.equal(u, v) for u, v in zip(seen, again))
    assert not torch.equal(torch.cat(seen[:10]), torch.cat(seen[10:]))  # a new draw each epoch
    assert not torch.equal(torch.cat(seen[:10]), torch.cat(other))


def test_balanced_sampling_with_a_map_style_dataset():
    seen, _ = balanced_draws(seed=0, data=Items(*imbalanced()))
    in_memory, _ = balanced_draws(seed=0)
    assert all(torch.equal(u, v) for u, v in zip(seen, in_memory))


def test_balanced_sampling_misuse_is_refused():
    data = imbalanced()
    with pytest.raises(ConfigError, match="balance_by.*hashable"):
        build(MLP(), data[:2], sampler="balanced", balance_by=lambda item: [int(item[1])], max_steps=1)
    with pytest.raises(ConfigError, match="balance_by"):
        build(MLP(), data[:2], sampler="balanced", max_steps=1)
    with pytest.raises(ConfigError, match="sampler"):
        build(MLP(), data[:2], balance_by=label_of, max_steps=1)
    with pytest.raises(ConfigError, match="sampler"):
        build(MLP(), data[:2], sampler="weighted", max_steps=1)


def test_tensor_labels_are_balanced_by_their_values():
    """A tensor hashes by identity; labels that are tensors (a one-hot row, a 0-dim class) count by value."""
    x, y, idx = imbalanced()
    onehot = F.one_hot(y, 2).float()
    seen, _ = balanced_draws(seed=0, data=(x, onehot, idx), balance_by=lambda item: item[1])
    by_value, _ = balanced_draws(seed=0)
    assert all(torch.equal(u, v) for u, v in zip(seen, by_value))  # the same weights as int labels
    seen, _ = balanced_draws(seed=0, balance_by=lambda item: item[1])  # a 0-dim tensor
    assert all(torch.equal(u, v) for u, v in zip(seen, by_value))


def test_balanced_sampling_resumes_exactly(tmp_path):
    def make(run: Path, **kw: Any) -> Trainer:
        return build(IndexedMLP(), Items(*imbalanced()), sampler="balanced", balance_by=label_of, batch_size=10,
                     max_steps=25, seed=2, run_dir=run, checkpoint_every=4, **kw)

    reference, resumed = assert_resumes_exactly(tmp_path, make, crash_at=14)  # resumes from step 12 (epoch 2)
    assert len(resumed.model.seen) == 13
    assert all(torch.equal(u, v) for u, v in zip(reference.model.seen[12:], resumed.model.seen))


# ---------------------------------------------------------------------------------------- labels given, per source
@pytest.mark.parametrize("as_kind", [list, torch.tensor, "numpy"])
def test_balance_by_a_sequence_of_labels_equals_the_callable(as_kind):
    import numpy as np

    _, y, _ = imbalanced()
    labels = y.numpy() if as_kind == "numpy" else as_kind(y.tolist())
    by_callable, _ = balanced_draws(seed=0)
    for data in (imbalanced(), Items(*imbalanced())):
        given, _ = balanced_draws(seed=0, data=data, balance_by=labels)
        assert all(torch.equal(u, v) for u, v in zip(given, by_callable))
    assert isinstance(labels, (list, torch.Tensor, np.ndarray))


class CountingItems(Items):
    """Counts item reads, to show that labels given up front need no pass over the items."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.reads = 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        self.reads += 1
        return super().__getitem__(i)


def test_balance_by_labels_reads_no_item_up_front():
    data = CountingItems(*imbalanced())
    _, y, _ = imbalanced()
    build(IndexedMLP(), data, sampler="balanced", balance_by=y.tolist(), batch_size=10, max_steps=1)
    assert data.reads == 0
    build(IndexedMLP(), data, sampler="balanced", balance_by=label_of, batch_size=10, max_steps=1)
    assert data.reads == 100  # the callable reads every item once


def test_balance_by_labels_follow_the_validation_split():
    """Labels given for train_data before valid_frac: the training side keeps its own items' labels."""
    from cadence.data.split import split_indices

    x, y, idx = imbalanced()
    model = IndexedMLP()
    build(model, (x, y, idx), valid_frac=0.2, split_seed=3, sampler="balanced", balance_by=y.tolist(),
          batch_size=10, max_epochs=1, seed=0).fit()
    train_idx, _ = split_indices(Items(x), 0.2, 3)
    train_labels = y[train_idx]
    counts = Counter(train_labels.tolist())
    weights = torch.tensor([1 / counts[int(v)] for v in train_labels], dtype=torch.float64)
    draws = torch.multinomial(weights, len(train_idx), replacement=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat(model.seen), torch.tensor(train_idx)[draws])


def test_sampler_and_balance_by_per_source():
    """The first source balanced by given labels, the second read in order: each as it would be alone."""
    x, y, idx = imbalanced()
    xb, yb = make_data(12, seed=2)
    sources = {"pos": (x, y, idx), "neg": (xb, yb, 1000 + torch.arange(12))}
    model = IndexedMLP()
    build(model, sources, mix="each", sampler={"pos": "balanced", "neg": "sequential"},
          balance_by={"pos": y.tolist()}, batch_size=10, max_steps=3, seed=0).fit()
    pos = [b for b in model.seen if int(b[0]) < 1000]
    neg = [b for b in model.seen if int(b[0]) >= 1000]
    alone, _ = balanced_draws(seed=0)  # source 0 has the run's seed, so it draws as the single source does
    assert all(torch.equal(u, v) for u, v in zip(pos, alone[:3]))
    assert torch.cat(neg).tolist() == [1000 + i for i in range(12)] + [1000 + i for i in range(10)]  # in order
    # a callable per source works the same
    again = IndexedMLP()
    build(again, sources, mix="each", sampler={"pos": "balanced"}, balance_by={"pos": label_of}, batch_size=10,
          max_steps=3, seed=0).fit()
    assert all(torch.equal(u, v) for u, v in zip([b for b in again.seen if int(b[0]) < 1000], pos))


def test_per_source_sampling_misuse_is_refused():
    x, y, idx = imbalanced()
    sources = {"pos": (x, y, idx), "neg": make_data(12, seed=2)}
    with pytest.raises(ConfigError, match=r"sampler=.*\['typo'\] are not sources; the sources are \['pos', 'neg'\]"):
        build(MLP(), sources, sampler={"typo": "balanced"}, max_steps=1)
    with pytest.raises(ConfigError, match=r"balance_by=.*\['typo'\] are not sources"):
        build(MLP(), sources, sampler={"pos": "balanced"}, balance_by={"typo": label_of}, max_steps=1)
    with pytest.raises(ConfigError, match=r"sampler='balanced'.*source 'neg'.*needs balance_by"):
        build(MLP(), sources, sampler="balanced", balance_by={"pos": label_of}, max_steps=1)
    with pytest.raises(ConfigError, match=r"balance_by=.*source 'pos'.*sampler='balanced'"):
        build(MLP(), sources, balance_by={"pos": label_of}, max_steps=1)
    with pytest.raises(ConfigError, match=r"balance_by='a sequence of 99 labels'.*100 items"):
        build(MLP(), {"pos": (x, y)}, sampler="balanced", balance_by=y.tolist()[:99], mix="each", max_steps=1)
    with pytest.raises(ConfigError, match=r"sampler=.*several training sources"):
        build(MLP(), (x, y), sampler={"pos": "balanced"}, balance_by={"pos": label_of}, max_steps=1)
    with pytest.raises(ConfigError, match=r"balance_by='a sequence of 3 labels'.*100 items"):
        build(MLP(), (x, y), sampler="balanced", balance_by=[0, 1, 0], max_steps=1)
