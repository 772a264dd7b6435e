"""``mix="concat"`` (every source's micro-batch joined into one batch, one forward) equals a hand-written loop
over the concatenated batches; ``val_data`` as a dict of sources is measured and logged per source."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cadence import ConfigError, EarlyStopping
from cadence.data.join import join_batches
from helpers import MLP, assert_weights_equal, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_concat_equals_one_forward_on_the_concatenated_batches():
    pos, neg = make_data(20, seed=1), make_data(12, seed=2)
    model = MLP()
    start = copy.deepcopy(model)
    calls: list[int] = []

    def forward(m, batch):
        calls.append(len(batch[0]))
        return m(*batch)

    t = trainer(model, {"pos": pos, "neg": neg}, mix="concat", shuffle=False, batch_size=4, grad_accum=2,
                max_steps=3, lr=0.1, optimizer="sgd", forward=forward, log_every=1)
    history = t.fit()
    # In order (shuffle=False): pos has 20 items (steps of 8, 8, 4), neg 12 (8, 4, then its second epoch).
    steps = [([(0, 4), (4, 8)], [(0, 4), (4, 8)]),
             ([(8, 12), (12, 16)], [(8, 10), (10, 12)]),
             ([(16, 18), (18, 20)], [(0, 4), (4, 8)])]
    ref = copy.deepcopy(start)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    sizes = []
    for pos_slices, neg_slices in steps:
        batches = [(torch.cat([pos[0][a:z], neg[0][c:d]]), torch.cat([pos[1][a:z], neg[1][c:d]]))
                   for (a, z), (c, d) in zip(pos_slices, neg_slices)]
        total = sum(len(x) for x, _ in batches)
        for x, y in batches:
            sizes.append(len(x))
            (F.cross_entropy(ref.net(x), y) * (len(x) / total)).backward()
        opt.step()
        opt.zero_grad()
    assert calls == sizes == [8, 8, 6, 6, 6, 6]  # one forward per joined micro-batch
    assert_weights_equal(model, ref)
    assert all("pos/loss" not in r.get("parts", {}) for r in history if r["split"] == "train")


def test_concat_refuses_source_weights_and_mismatched_batches():
    x, y = make_data(16)
    with pytest.raises(ConfigError, match="source_weights"):
        trainer(MLP(), {"a": (x, y), "b": (x, y)}, mix="concat", source_weights={"a": 2.0}, batch_size=4,
                max_steps=1)
    t = trainer(MLP(), {"a": (x, y), "b": {"x": x, "y": y}}, mix="concat", batch_size=4, max_steps=1)
    with pytest.raises(ConfigError, match="different types"):
        t.fit()


def test_join_batches_field_by_field():
    a = {"ids": torch.zeros(2, 3), "text": ["x", "y"], "pair": (torch.ones(2), torch.ones(2, 1))}
    b = {"ids": torch.ones(1, 3), "text": ["z"], "pair": (torch.zeros(1), torch.zeros(1, 1))}
    joined = join_batches([a, b], ["a", "b"])
    assert joined["ids"].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert joined["text"] == ["x", "y", "z"]
    assert isinstance(joined["pair"], tuple) and joined["pair"][0].tolist() == [1, 1, 0]
    with pytest.raises(ConfigError, match="different keys"):
        join_batches([a, {"ids": torch.ones(1, 3)}], ["a", "b"])


def test_val_data_dict_is_measured_and_logged_per_source():
    pos, neg = make_data(30, seed=1), make_data(10, seed=2)
    train = make_data(40)

    def acc(output, batch):
        return torch.tensor(0.5)

    t = trainer(MLP(), train, val_data={"pos": pos, "neg": neg}, batch_size=8, max_steps=5, val_every=5,
                metrics={"acc": acc})
    history = t.fit()
    metrics = t.last_val_metrics
    assert set(metrics) == {"val/pos/loss", "val/neg/loss", "val/pos/acc", "val/neg/acc"}  # no mean: not asked
    assert history["val/pos/loss"] == [metrics["val/pos/loss"]] and history["val/loss"] == []
    val = [r for r in history if r["split"].startswith("val")]
    assert [(r["split"], r["loss"], r["parts"]) for r in val] == [
        ("val/pos", metrics["val/pos/loss"], {"acc": 0.5}), ("val/neg", metrics["val/neg/loss"], {"acc": 0.5})]
    # each source measured on its own
    alone = {name: trainer(t.model, train, val_data=data, batch_size=8, max_steps=1).validate()["val/loss"]
             for name, data in (("pos", pos), ("neg", neg))}
    assert metrics["val/pos/loss"] == pytest.approx(alone["pos"])
    assert metrics["val/neg/loss"] == pytest.approx(alone["neg"])
    # val_mean=True: also the plain figure, their mean (each source counting once), in a record of split "val"
    meaned = trainer(t.model, train, val_data={"pos": pos, "neg": neg}, batch_size=8, max_steps=1, val_mean=True,
                     metrics={"acc": acc}).validate()
    assert meaned["val/loss"] == pytest.approx((alone["pos"] + alone["neg"]) / 2) and meaned["val/acc"] == 0.5
    assert meaned["val/pos/loss"] == metrics["val/pos/loss"]


def test_several_validation_sets_name_what_is_watched():
    sets = {"pos": make_data(10, seed=1), "neg": make_data(10, seed=2)}
    kw = dict(val_data=sets, batch_size=8, max_steps=2)
    with pytest.raises(ConfigError, match=r"EarlyStopping monitor='val/loss'.*pos, neg.*'val/pos/loss'.*val_mean"):
        trainer(MLP(), make_data(40), early_stopping=[EarlyStopping()], **kw)  # the default monitor, val/loss
    with pytest.raises(ConfigError, match=r"keep_best='val/loss'.*val_mean=True"):
        trainer(MLP(), make_data(40), keep_best=("val/loss", "min"), run_dir="unused", **kw)
    with pytest.raises(ConfigError, match=r"Plateau monitor='val/loss'"):
        trainer(MLP(), make_data(40), schedule="plateau", **kw)
    # a set's own figure, or the mean when asked for, is fine
    trainer(MLP(), make_data(40), early_stopping=[EarlyStopping("val/neg/loss")], **kw).fit()
    t = trainer(MLP(), make_data(40), early_stopping=[EarlyStopping()], val_mean=True, **kw)
    t.fit()
    assert t.history["val/loss"] and t.history["val/neg/loss"]
