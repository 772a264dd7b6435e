"""Batch routing (tuple, dict, tensor, ``forward=``) and the three model output forms with their parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cadence.outputs import call_model, read_output
from helpers import MLP, assert_weights_changed, assert_weights_equal, clone, contract_batches, make_data, trainer

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
    expected = [sum(b.float().mean().item() for b in batches[k:k + 3]) / 3 for k in (0, 3)]
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
