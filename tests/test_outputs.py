"""Batch routing (tuple, dict, tensor, ``forward=``) and the three model output forms with their parts."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cadence import ConfigError
from cadence.outputs import call_model, read_output
from helpers import (
    MLP,
    assert_weights_changed,
    assert_weights_close,
    assert_weights_equal,
    clone,
    contract_batches,
    make_data,
    trainer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------- routing


class KwargsOnly(MLP):
    """``forward(*, y, x)``: only keyword arguments work, so a dict batch must be routed as ``model(**batch)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, *, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        assert x.dtype == torch.float32 and y.dtype == torch.long
        self.calls.append(tuple(x.shape))
        return F.cross_entropy(self.net(x), y)


class TensorOnly(MLP):
    """``forward(x)``: one tensor argument, an autoencoder-ish loss."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.back = nn.Linear(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.shapes.append(tuple(x.shape))
        return F.mse_loss(self.back(self.net(x)), x)


def test_tuple_batch_is_unpacked_positionally():
    x, y = make_data(20)
    model = MLP()
    calls: list[tuple] = []
    original = model.forward

    def spy(*args, **kwargs):
        calls.append((len(args), sorted(kwargs)))
        return original(*args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    trainer(model, (x, y), batch_size=8, max_steps=3).fit()
    assert calls == [(2, [])] * 3


def test_list_of_tensors_is_unpacked_positionally():
    x, y = make_data(20)
    model = MLP()
    initial = clone(model)
    trainer(model, [x, y], batch_size=8, max_steps=3).fit()
    assert_weights_changed(initial, model)


def test_dict_batch_is_passed_as_keywords():
    x, y = make_data(20)
    model = KwargsOnly()
    initial = clone(model)
    trainer(model, {"x": x, "y": y}, batch_size=8, max_steps=4).fit()
    assert model.calls == [(8, 8), (8, 8), (4, 8), (8, 8)]  # 20 items: 8, 8, then the partial 4
    assert_weights_changed(initial, model)


def test_dict_from_a_dataloader_is_passed_as_keywords():
    x, y = make_data(20)
    rows = [{"x": x[i], "y": y[i]} for i in range(20)]
    model = KwargsOnly()
    loader = torch.utils.data.DataLoader(rows, batch_size=5)
    trainer(model, loader, max_steps=4).fit()
    assert model.calls == [(5, 8)] * 4


def test_single_tensor_batch_is_passed_alone():
    x, _ = make_data(20)
    model = TensorOnly()
    initial = clone(model)
    trainer(model, x, batch_size=8, max_steps=3).fit()
    assert model.shapes == [(8, 8), (8, 8), (4, 8)]
    assert_weights_changed(initial, model)


def test_forward_callable_overrides_routing():
    x, y = make_data(20)
    model = MLP()
    seen: list[int] = []

    def forward(m, batch):
        assert m is model
        assert isinstance(batch, tuple) and len(batch) == 2
        seen.append(len(batch[0]))
        return F.cross_entropy(m.logits(batch[0]), batch[1])  # never calls model.forward

    model.forward = None  # type: ignore[assignment]  # routing would fail if it were used
    trainer(model, (x, y), batch_size=8, max_steps=3, forward=forward).fit()
    assert seen == [8, 8, 4]


def test_forward_callable_is_used_in_validation_too():
    x, y = make_data(20)
    calls = {"n": 0}

    def forward(m, batch):
        calls["n"] += 1
        return m(*batch)

    t = trainer(MLP(), (x, y), val_data=make_data(10, seed=1), batch_size=8, max_steps=2, forward=forward)
    t.fit()
    assert calls["n"] == 2 + 2  # two training steps, one validation of 10 items in batches of 8 and 2


def test_call_model_unit():
    seen = []

    class Echo(nn.Module):
        def forward(self, *args, **kwargs):
            seen.append((args, kwargs))
            return torch.tensor(0.0)

    m, a, b = Echo(), torch.ones(1), torch.zeros(1)
    call_model(m, (a, b), None)
    call_model(m, [a, b], None)
    call_model(m, {"p": a, "q": b}, None)
    call_model(m, a, None)
    assert [(len(args), sorted(kw)) for args, kw in seen] == [(2, []), (2, []), (0, ["p", "q"]), (1, [])]
    assert call_model(m, "anything", lambda model, batch: (model, batch)) == (m, "anything")


# ----------------------------------------------------------------------------------------------- outputs
class Outputs(MLP):
    """Returns the same loss in one of three forms, with parts ``double`` (2 * loss) and ``mean_idx``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def forward(self, x, y, idx):  # type: ignore[override]
        loss = F.cross_entropy(self.net(x), y)
        parts = {"double": 2 * loss.detach(), "mean_idx": idx.float().mean(), "const": 3.0}
        if self.form == "scalar":
            return loss
        if self.form == "tuple":
            return loss, parts
        return {"loss": loss, **parts}


def indexed(n: int):
    x, y = make_data(n)
    return x, y, torch.arange(n)


@pytest.mark.parametrize("form", ["scalar", "tuple", "dict"])
def test_output_forms_train_the_same(form):
    data = indexed(20)
    reference = Outputs("scalar")
    model = Outputs(form)
    assert_weights_equal(model, reference)
    initial = clone(model)
    trainer(reference, data, batch_size=8, max_steps=5, lr=1e-2).fit()
    t = trainer(model, data, batch_size=8, max_steps=5, lr=1e-2, log_every=1)
    t.fit()
    assert_weights_changed(initial, model)
    assert_weights_equal(model, reference)  # the parts never touch the gradient
    records = [r for r in t.history if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    if form == "scalar":
        assert all(r["parts"] == {} for r in records)
        assert t.history["train/double"] == []
    else:
        assert all(set(r["parts"]) == {"double", "mean_idx", "const"} for r in records)
        assert t.history["train/double"] == pytest.approx([2 * v for v in t.history["train/loss"]], rel=1e-6)
        assert t.history["train/const"] == pytest.approx([3.0] * 5)


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_parts_are_weighted_by_micro_batch_size(grad_accum):
    """A logged part is the mean over the step's items, even with uneven micro-batches (the last step)."""
    n, b, seed = 23, 2, 0
    t = trainer(Outputs("dict"), indexed(n), batch_size=b, grad_accum=grad_accum, max_steps=6, log_every=1,
                seed=seed)
    t.fit()
    batches = contract_batches(n, b * grad_accum, seed, 6)
    expected = [idx.float().mean().item() for idx in batches]
    assert t.history["train/mean_idx"] == pytest.approx(expected, rel=1e-6)


def test_logged_part_is_the_mean_of_the_window_steps():
    t = trainer(Outputs("tuple"), indexed(20), batch_size=8, max_steps=6, log_every=3, seed=0)
    t.fit()
    batches = contract_batches(20, 8, 0, 6)
    # a mean of per-step means (each step weighted equally)
    windows = [(0, 1), (1, 3), (3, 6)]  # step 1 is a log point of its own, then every 3 steps
    expected = [sum(b.float().mean().item() for b in batches[i:j]) / (j - i) for i, j in windows]
    assert t.history["train/mean_idx"] == pytest.approx(expected, rel=1e-6)


def test_read_output_unit():
    loss = torch.tensor(2.0, requires_grad=True) * 1.0
    out = read_output(loss, training=True)
    assert out.loss is loss and out.parts == {} and out.num_items is None

    out = read_output((loss, {"a": torch.tensor([1.5]), "b": 2}), training=True)
    assert out.loss is loss
    assert {k: v.item() for k, v in out.parts.items()} == {"a": 1.5, "b": 2.0}
    assert all(v.ndim == 0 for v in out.parts.values())

    out = read_output({"loss": loss, "num_items": 7, "acc": torch.tensor(0.5)}, training=True)
    assert out.num_items == 7
    assert set(out.parts) == {"acc"}

    # in evaluation a loss without grad is fine
    assert read_output(torch.tensor(1.0), training=False).loss.item() == 1.0


# ----------------------------------------------------------------------------------------------- tuple parts
class Breakdown(NamedTuple):
    generator_loss: torch.Tensor
    critic_loss: torch.Tensor | None


class TupleParts(MLP):
    """Returns ``(loss, parts)`` as the seeds' real models do: ``"named"`` a NamedTuple (soundstorm's
    ``LossBreakdown``), ``"plain"`` a tuple (meshgpt's ``(recon, commit)``); ``critic=False`` leaves the second
    entry ``None``. The parts are ``2 * loss`` and ``idx.mean()``."""

    def __init__(self, form: str, critic: bool = True) -> None:
        super().__init__()
        self.form, self.critic = form, critic

    def forward(self, x, y, idx):  # type: ignore[override]
        loss = F.cross_entropy(self.net(x), y)
        first, second = 2 * loss, (idx.float().mean() if self.critic else None)
        return loss, (Breakdown(first, second) if self.form == "named" else (first, second))


def test_read_output_names_tuple_parts():
    loss, a, b = torch.tensor(1.0, requires_grad=True) * 1.0, torch.tensor(2.0), torch.tensor([3.0])
    named = read_output((loss, Breakdown(a, b)), training=True)
    assert named.loss is loss and {k: v.item() for k, v in named.parts.items()} == {"generator_loss": 2.0,
                                                                                   "critic_loss": 3.0}
    plain = read_output((loss, (a, b)), training=True)
    assert {k: v.item() for k, v in plain.parts.items()} == {"part0": 2.0, "part1": 3.0}
    listed = read_output((loss, [a, b]), training=False, part_names=["recon", "commit"])
    assert {k: v.item() for k, v in listed.parts.items()} == {"recon": 2.0, "commit": 3.0}
    renamed = read_output((loss, Breakdown(a, b)), training=True, part_names=("g", "c"))
    assert set(renamed.parts) == {"g", "c"}  # names from the config win over the fields
    assert set(read_output((loss, Breakdown(a, None)), training=True).parts) == {"generator_loss"}
    with pytest.raises(ConfigError, match=r"part_names=\['recon'\].*2 parts.*not 1"):
        read_output((loss, (a, b)), training=True, part_names=["recon"])
    # a vector part (meshgpt's commit loss, one per quantizer) is logged as its sum; a matrix is refused
    assert read_output((loss, (a, torch.ones(3))), training=False).parts["part1"].item() == 3.0
    with pytest.raises(ConfigError, match="'part1'.*scalar"):
        read_output((loss, (a, torch.ones(3, 2))), training=False)
    weighted = read_output((loss * 0, (a.requires_grad_(), b)), training=True, loss_weights={"part0": 0.5})
    assert weighted.loss.item() == 1.0 and set(weighted.parts) == {"part0", "part1"}


@pytest.mark.parametrize("form,names,expected", [("named", None, ("generator_loss", "critic_loss")),
                                                 ("plain", None, ("part0", "part1")),
                                                 ("plain", ["recon", "commit"], ("recon", "commit"))])
def test_tuple_parts_are_logged_by_name_in_training_and_validation(form, names, expected):
    data, val = indexed(20), indexed(12)
    reference, model = Outputs("scalar"), TupleParts(form)
    trainer(reference, data, batch_size=8, max_steps=4, lr=1e-2).fit()
    t = trainer(model, data, val_data=val, batch_size=8, max_steps=4, lr=1e-2, log_every=1, val_every=4,
                part_names=names)
    t.fit()
    assert_weights_equal(model, reference)  # the parts never touch the gradient
    first, second = expected
    assert t.history[f"train/{first}"] == pytest.approx([2 * v for v in t.history["train/loss"]], rel=1e-6)
    batches = contract_batches(20, 8, 0, 4)
    assert t.history[f"train/{second}"] == pytest.approx([b.float().mean().item() for b in batches], rel=1e-6)
    assert t.history[f"val/{first}"] == pytest.approx([2 * t.history["val/loss"][0]], rel=1e-6)
    assert t.history[f"val/{second}"] == pytest.approx([(8 * 3.5 + 4 * 9.5) / 12], rel=1e-6)  # idx 0-7, 8-11


def test_a_none_tuple_part_is_left_out():
    t = trainer(TupleParts("named", critic=False), indexed(20), batch_size=8, max_steps=2, log_every=1)
    t.fit()
    assert all(set(r["parts"]) == {"generator_loss"} for r in t.history if r["split"] == "train")


def test_part_names_of_the_wrong_length_fail_at_the_first_step():
    model = TupleParts("plain")
    initial = clone(model)
    t = trainer(model, indexed(20), batch_size=8, max_steps=3, part_names=["recon", "commit", "extra"])
    with pytest.raises(ConfigError, match="part_names.*2 parts.*not 3"):
        t.fit()
    assert t.step == 0
    assert_weights_equal(model, initial)


def test_tuple_parts_with_loss_weights():
    """``loss_weights`` sums named tuple parts: here ``2 * cross-entropy`` at weight 0.5 is the cross-entropy."""
    data = indexed(20)
    reference, model = Outputs("scalar"), TupleParts("named")
    trainer(reference, data, batch_size=8, max_steps=4, lr=1e-2).fit()
    trainer(model, data, batch_size=8, max_steps=4, lr=1e-2, loss_weights={"generator_loss": 0.5}).fit()
    assert_weights_close(model, reference)


# ----------------------------------------------------------------------------------------------- call keywords
class Flagged(MLP):
    """``forward(x, y, *, scale=1.0, breakdown=False)``: records the keywords of every call, by mode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, dict]] = []

    def forward(self, x, y, *, scale=1.0, breakdown=False):  # type: ignore[override]
        self.calls.append((self.training, {"scale": scale, "breakdown": breakdown}))
        loss = F.cross_entropy(self.net(x), y) * scale
        return (loss, {"ce": loss.detach()}) if breakdown else loss


def keywords(model: Flagged, training: bool) -> list[dict]:
    return [kw for mode, kw in model.calls if mode == training]


@pytest.mark.parametrize("val_kwargs,in_validation", [(None, {"scale": 2.0, "breakdown": True}),
                                                      ({}, {"scale": 1.0, "breakdown": False}),
                                                      ({"scale": 3.0}, {"scale": 3.0, "breakdown": False})])
def test_forward_kwargs_reach_every_call(val_kwargs, in_validation):
    """Training calls get forward_kwargs; validation calls val_forward_kwargs, which default to forward_kwargs."""
    x, y = make_data(20)
    model = Flagged()
    t = trainer(model, (x, y), val_data=make_data(10, seed=1), batch_size=8, max_steps=3, val_every=3,
                log_every=1, forward_kwargs={"scale": 2.0, "breakdown": True}, val_forward_kwargs=val_kwargs)
    t.fit()
    assert keywords(model, True) == [{"scale": 2.0, "breakdown": True}] * 3
    assert keywords(model, False) == [in_validation] * 2  # 10 items in batches of 8 and 2
    assert len(t.history["train/ce"]) == 3 and ("val/ce" in t.last_val_metrics) == in_validation["breakdown"]


def test_forward_kwargs_scale_the_gradient_as_the_call_says():
    x, y = make_data(20)
    reference, model = Flagged(), Flagged()
    trainer(reference, (x, y), batch_size=8, max_steps=3, optimizer="sgd", lr=2e-2).fit()
    trainer(model, (x, y), batch_size=8, max_steps=3, optimizer="sgd", lr=1e-2, forward_kwargs={"scale": 2.0}).fit()
    assert_weights_close(model, reference)


def test_forward_kwargs_with_dict_batches_and_inputs():
    x, y = make_data(20)
    model = KwargsOnly()
    call_model(model, {"x": x[:4], "y": y[:4]}, None, None, {})  # no keywords: as before
    seen = []

    class Echo(nn.Module):
        def forward(self, *args, **kwargs):
            seen.append((len(args), sorted(kwargs)))
            return torch.tensor(0.0)

    echo, flag = Echo(), {"flag": True}
    call_model(echo, (x, y), None, None, flag)
    call_model(echo, {"x": x}, None, None, flag)
    call_model(echo, x, None, None, flag)
    call_model(echo, (x, y), None, ["a", "b"], flag)
    assert seen == [(2, ["flag"]), (0, ["flag", "x"]), (1, ["flag"]), (0, ["a", "b", "flag"])]
    with pytest.raises(ConfigError, match=r"forward_kwargs=\{'x': 1\}.*\['x'\]"):
        call_model(echo, {"x": x}, None, None, {"x": 1})


def test_forward_kwargs_checks():
    data = make_data(20)
    with pytest.raises(ConfigError, match="forward_kwargs=.*forward=callable"):
        trainer(MLP(), data, max_steps=1, forward_kwargs={"a": 1}, forward=lambda m, b: m(*b))
    with pytest.raises(ConfigError, match="val_forward_kwargs=.*mapping"):
        trainer(MLP(), data, max_steps=1, val_forward_kwargs=["a"])
    with pytest.raises(ConfigError, match="part_names='recon'.*list"):
        trainer(MLP(), data, max_steps=1, part_names="recon")
    with pytest.raises(ConfigError, match="part_names=.*distinct"):
        trainer(MLP(), data, max_steps=1, part_names=["a", "a"])
