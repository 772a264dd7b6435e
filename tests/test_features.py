"""Field routing (``inputs``), loss weights, validation metrics, epoch summaries, and one kill-and-resume run with
EMA, early stopping, stages and two sources all on at once (the other features: test_ema.py, test_stopping.py,
test_stages.py, test_sources.py, test_collate.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cadence import EMA, ConfigError, EarlyStopping, Stage, Trainer
from helpers import MLP, CrashAt, make_data

pytestmark = pytest.mark.usefixtures("one_thread")


def build(model: nn.Module, data: Any, **kw: Any) -> Trainer:
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return Trainer(model, data, **kw)


# ------------------------------------------------------------------------------------------------ field routing
class Named(nn.Module):
    """Keyword-only arguments in the opposite order to the batch's fields: positional routing would fail."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 2)
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, *, texts: torch.Tensor, wavs: torch.Tensor) -> torch.Tensor:
        self.calls.append({"wavs": wavs, "texts": texts})
        return F.cross_entropy(self.lin(wavs), texts)


class WavsAndTexts(Dataset):
    """A map-style dataset that declares its fields' names."""

    inputs = ("wavs", "texts")

    def __init__(self, n: int = 12) -> None:
        self.x, self.y = make_data(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_inputs_name_the_fields_of_a_tuple_batch():
    x, y = make_data(12)
    model = Named()
    t = build(model, (x, y), val_data=make_data(6, seed=1), inputs=("wavs", "texts"), batch_size=4, max_steps=3)
    t.fit()
    assert len(model.calls) == 3 + 2  # three steps and the final validation (6 items: 2 batches)
    for call in model.calls:
        assert call["wavs"].dtype == torch.float32 and call["wavs"].shape[1] == 8
        assert call["texts"].dtype == torch.int64
    first = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:4]
    assert torch.equal(model.calls[0]["wavs"], x[first]) and torch.equal(model.calls[0]["texts"], y[first])


def test_a_dataset_attribute_inputs_does_the_same():
    model = Named()
    build(model, WavsAndTexts(), val_data=WavsAndTexts(4), batch_size=4, max_steps=3).fit()
    assert len(model.calls) == 3 + 1


def test_inputs_pick_fields_of_a_dict_batch():
    x, y = make_data(12)
    model = Named()
    build(model, {"wavs": x, "texts": y, "ids": torch.arange(12)}, inputs=("wavs", "texts"), batch_size=4,
          max_steps=2).fit()
    assert len(model.calls) == 2  # "ids" was not passed (forward would reject it)


def test_inputs_longer_than_the_batch_are_refused():
    x, y = make_data(12)
    t = build(Named(), (x, y), inputs=("wavs", "texts", "speakers"), batch_size=4, max_steps=2)
    with pytest.raises(ConfigError, match="inputs") as err:
        t.fit()
    assert "3 fields" in str(err.value) and "has 2" in str(err.value)
    t = build(Named(), {"wavs": x, "texts": y}, inputs=("wavs", "speakers"), batch_size=4, max_steps=2)
    with pytest.raises(ConfigError, match="speakers"):
        t.fit()


# ------------------------------------------------------------------------------------------------ loss weights
class TwoLosses(MLP):
    """Returns named parts only: recon, commit, and an auxiliary value that is not weighted."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits = self.net(x)
        return {"recon": F.cross_entropy(logits, y), "commit": logits.pow(2).mean(), "aux": logits.abs().mean()}


WEIGHTS = {"recon": 1.0, "commit": 0.25}


def test_the_loss_is_the_weighted_sum_of_the_parts():
    x, y = make_data(24)
    model = TwoLosses()
    hand = copy.deepcopy(model)
    t = build(model, (x, y), val_data=make_data(8, seed=1), loss_weights=WEIGHTS, batch_size=8, max_steps=6, lr=0.1,
              optimizer="sgd", log_every=1)
    t.fit()

    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    expected = []
    for step in range(6):
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(step // 3))
        idx = perm[(step % 3) * 8:(step % 3 + 1) * 8]
        out = hand(x[idx], y[idx])
        total = out["recon"] + 0.25 * out["commit"]  # "aux" is not in the total
        total.backward()
        opt.step()
        opt.zero_grad()
        expected.append((total.item(), {k: v.item() for k, v in out.items()}))
    for k, v in hand.state_dict().items():
        torch.testing.assert_close(t.model.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)

    train = [r for r in t.history if r["split"] == "train"]
    assert len(train) == 6
    for r, (total, parts) in zip(train, expected):
        assert r["loss"] == pytest.approx(total, rel=1e-6)
        assert r["parts"].keys() == {"recon", "commit", "aux"}  # every part still logged
        for k, v in parts.items():
            assert r["parts"][k] == pytest.approx(v, rel=1e-6)
    val = t.history.last("val")
    assert val["loss"] == pytest.approx(val["parts"]["recon"] + 0.25 * val["parts"]["commit"], rel=1e-6)


def test_loss_weights_with_a_loss_and_parts_tuple():
    class Pair(TwoLosses):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:  # type: ignore[override]
            parts = super().forward(x, y)
            return parts["recon"] * 100, parts  # the returned loss is replaced by the weighted sum

    t = build(Pair(), make_data(16), loss_weights={"commit": 2.0}, batch_size=8, max_steps=1, log_every=1)
    t.fit()
    r = t.history.last("train")
    assert r["loss"] == pytest.approx(2.0 * r["parts"]["commit"], rel=1e-6)


def test_a_loss_weight_for_a_part_never_returned_is_refused():
    t = build(TwoLosses(), make_data(16), loss_weights={"recon": 1.0, "vq": 0.5}, batch_size=8, max_steps=2)
    with pytest.raises(ConfigError, match="vq") as err:
        t.fit()
    assert "commit" in str(err.value)  # what the model does return
    t = build(MLP(), make_data(16), loss_weights={"recon": 1.0}, batch_size=8, max_steps=2)  # a bare loss: no parts
    with pytest.raises(ConfigError, match="loss_weights"):
        t.fit()


# ------------------------------------------------------------------------------------------------ validation metrics
class CountsCorrect(MLP):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "correct": (logits.argmax(1) == y).float().mean()}


def test_validation_metrics_are_logged_and_weighted_by_batch_size():
    xv, yv = make_data(10, seed=3)  # batches of 4, 4 and 2

    def positives(output: Any, batch: Any) -> torch.Tensor:
        return batch[1].float().mean()

    def acc(output: Any, batch: Any) -> torch.Tensor:
        return output["correct"]  # the model's raw output

    model = CountsCorrect()
    t = build(model, make_data(16), val_data=(xv, yv), batch_size=4, max_steps=2, val_every=1,
              metrics={"positives": positives, "acc": acc})
    t.fit()
    assert len(t.history["val/positives"]) == 2 and len(t.history["val/acc"]) == 2
    assert t.history["val/positives"][-1] == pytest.approx(yv.float().mean().item(), rel=1e-6)
    unweighted = sum(yv[i:i + 4].float().mean().item() for i in range(0, 10, 4)) / 3
    assert unweighted != pytest.approx(yv.float().mean().item(), rel=1e-3)  # the data tells the two apart
    with torch.no_grad():
        expected_acc = (model.net(xv).argmax(1) == yv).float().mean().item()
    assert t.history["val/acc"][-1] == pytest.approx(expected_acc, rel=1e-6)
    assert t.last_val_metrics["val/acc"] == t.history["val/acc"][-1]
    assert t.validate()["val/positives"] == pytest.approx(yv.float().mean().item(), rel=1e-6)


class WithLogits(MLP):
    """Returns its predictions in validation (entries that are not scalars are left to the metrics there)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits = self.net(x)
        out = {"loss": F.cross_entropy(logits, y)}
        return out if self.training else {**out, "logits": logits}


def accuracy(output: Any, batch: Any) -> torch.Tensor:
    return (output["logits"].argmax(1) == batch[1]).float().mean()


def test_a_metric_reads_the_predictions_of_the_model_validated():
    xv, yv = make_data(10, seed=3)
    t = build(WithLogits(), make_data(32), val_data=(xv, yv), batch_size=4, max_steps=6, lr=0.05,
              metrics={"acc": accuracy}, ema=EMA(beta=0.5), validate_on="both")
    t.fit()
    with torch.no_grad():
        live = (t.model.net(xv).argmax(1) == yv).float().mean().item()
        averaged = (t.ema.model.net(xv).argmax(1) == yv).float().mean().item()
    assert t.history["val/acc"][-1] == pytest.approx(live, rel=1e-6)
    assert t.history["val_ema/acc"][-1] == pytest.approx(averaged, rel=1e-6)  # the EMA's own predictions
    assert "logits" not in t.history.last("val")["parts"]
    assert t.history["val/loss"][-1] != t.history["val_ema/loss"][-1]  # two different models were measured


def test_a_non_scalar_entry_in_training_is_refused():
    class AlwaysLogits(MLP):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

    with pytest.raises(ConfigError, match="logits"):
        build(AlwaysLogits(), make_data(16), batch_size=4, max_steps=1).fit()


# ------------------------------------------------------------------------------------------------ epoch summaries
class PartsMLP(MLP):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "top": logits.max(1).values.mean(), "spread": logits.std()}


def summaries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in history if r["split"] == "train_epoch"]


def epoch_run(log_every: int, **kw: Any) -> Trainer:
    # 22 items in batches of 4: five full steps and one of 2 items per epoch
    t = build(PartsMLP(), make_data(22), batch_size=4, max_epochs=3, lr=0.05, log_every=log_every,
              max_grad_norm=1.0, **kw)
    t.fit()
    return t


def test_epoch_summaries_are_the_mean_of_each_epoch():
    per_step = [r for r in epoch_run(log_every=1).history if r["split"] == "train"]
    assert len(per_step) == 18  # log_every=1: one record per step, each that step's values
    for log_every in (1, 4, 6, 50):  # 4 does not divide the epoch, 50 is longer than the run
        t = epoch_run(log_every=log_every, val_data=make_data(8, seed=1), val_every=5)
        epochs = summaries(t.history)
        assert [(r["step"], r["epoch"]) for r in epochs] == [(6, 0), (12, 1), (18, 2)]
        for e, r in enumerate(epochs):
            steps = per_step[6 * e:6 * (e + 1)]
            assert r["loss"] == pytest.approx(sum(s["loss"] for s in steps) / 6, rel=1e-6)
            assert r["parts"].keys() == {"top", "spread"}  # every part, no grad_norm
            for part in ("top", "spread"):
                assert r["parts"][part] == pytest.approx(sum(s["parts"][part] for s in steps) / 6, rel=1e-6)
    assert t.history["train_epoch/loss"] == [r["loss"] for r in epochs]


def resumed_epoch_runs(tmp_path: Path) -> tuple[Trainer, list[dict[str, Any]]]:
    """The reference and the records of a run crashed at step 9 and resumed from its checkpoint at step 7, where
    the summary of epoch 0 (steps 1-6) was not yet logged (log_every=4: it comes out at step 8)."""

    reference = epoch_run(log_every=4, run_dir=tmp_path / "ref", checkpoint_every=7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        epoch_run(log_every=4, run_dir=tmp_path / "run", checkpoint_every=7, callbacks=[CrashAt(9)])
    epoch_run(log_every=4, run_dir=tmp_path / "run", checkpoint_every=7, resume="auto")
    return reference, records(tmp_path / "run")


def test_epoch_summaries_survive_resume(tmp_path):
    reference, resumed = resumed_epoch_runs(tmp_path)
    expected = {(r["step"], r["epoch"]): strip(r) for r in summaries(reference.history)}
    assert len(expected) == 3
    assert {(r["step"], r["epoch"]): strip(r) for r in summaries(resumed)} == expected  # values exact


def test_a_resumed_run_logs_each_epoch_summary_once(tmp_path):
    """The summary of epoch 0 is labelled step 6 but written at step 8, after the checkpoint: it is not kept from
    the crashed run's metrics.jsonl and logged again."""
    reference, resumed = resumed_epoch_runs(tmp_path)
    assert [strip(r) for r in summaries(resumed)] == [strip(r) for r in summaries(reference.history)]


@pytest.mark.parametrize("shape,part", [
    pytest.param((), lambda p: p, id="parameter"),
    pytest.param((1,), lambda p: p[0], id="element"),
    pytest.param((1,), lambda p: p.squeeze(), id="squeeze"),
])
def test_a_part_that_is_a_parameter_is_logged_with_the_steps_value(shape, part):
    """A learned temperature returned as a part is logged with the value the step used, not the value the optimizer
    has changed it to (in place) by the log point."""

    class Temperature(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = nn.Parameter(torch.ones(shape))
            self.values: list[float] = []

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            self.values.append(self.temperature.item())
            return {"loss": F.cross_entropy(self.net(x) / self.temperature, y), "temperature": part(self.temperature)}

    model = Temperature()
    t = build(model, make_data(16), batch_size=4, max_steps=4, lr=0.1, log_every=1)
    t.fit()
    logged = [r["parts"]["temperature"] for r in t.history if r["split"] == "train"]
    assert logged == pytest.approx(model.values, rel=1e-6)
    assert len(set(model.values)) == 4  # it did change at every step
    model = Temperature()
    t = build(model, make_data(16), batch_size=4, max_steps=4, lr=0.1, log_every=4)
    t.fit()
    # step 1 is logged alone, then the mean of steps 2-4
    assert t.history["train/temperature"] == pytest.approx([model.values[0], sum(model.values[1:]) / 3], rel=1e-6)


# ------------------------------------------------------------------------------------------------ everything at once
TIMING = ("samples_per_s", "elapsed_s")


def strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMING}


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class BNDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.encoder(x))
        return {"loss": F.cross_entropy(logits, y), "top": logits.max(1).values.mean()}


class Items(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Scripted:
    """A validation metric scripted by step: validations at steps 2, 4, 6... give curve[0], curve[1], ..."""

    def __init__(self, curve: list[float]) -> None:
        self.curve, self.trainer = curve, None

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        return torch.tensor(self.curve[min(self.trainer.step // 2 - 1, len(self.curve) - 1)])


def everything(run: Path, **kw: Any) -> Trainer:
    scripted = Scripted([1.0, 0.5, 0.75, 0.75, 0.75, 0.25])  # patience 3: stops at step 10
    t = build(
        BNDropout(),
        {"pos": make_data(16, seed=1), "neg": Items(*make_data(10, seed=2))},
        mix="each", source_weights={"pos": 1.0, "neg": 0.5},
        val_data=make_data(8, seed=3), val_every=2, metrics={"s": scripted},
        ema=EMA(beta=0.9, power=0.75), validate_on="both",
        early_stopping=[EarlyStopping("val/s", patience=3), EarlyStopping("val_ema/loss", patience=50)],
        stop_when="any",
        stages=[Stage(steps=5, trainable=["encoder.*"]),
                Stage(steps=15, lr=3e-3, param_groups={"head.*": {"lr": 1e-2}})],
        param_groups={"*.bias": {"weight_decay": 0.0}}, weight_decay=0.01,
        batch_size=4, lr=1e-2, warmup_steps=2, schedule="cosine", max_grad_norm=1.0, seed=11, log_every=3,
        run_dir=run, checkpoint_every=3, **kw)
    scripted.trainer = t
    return t


def test_kill_and_resume_with_ema_early_stopping_stages_and_two_sources(tmp_path):
    reference = everything(tmp_path / "ref")
    assert reference.max_steps == 20
    reference.fit()
    assert reference.step == 10 and reference.stage_index == 1  # stopped early, in the second stage
    assert "val/s" in reference.stop_reason

    with pytest.raises(RuntimeError, match="simulated crash"):
        everything(tmp_path / "run", callbacks=[CrashAt(8)]).fit()  # the newest checkpoint is step 6 (stage 2)
    resumed = everything(tmp_path / "run", resume="auto")
    resumed.fit()

    assert resumed.step == reference.step and resumed.stop_reason == reference.stop_reason
    for a, b in ((reference.model, resumed.model), (reference.ema.model, resumed.ema.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    ra, rb = reference.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert ra["param_groups"] == rb["param_groups"]
    for i in ra["state"]:
        for key, value in ra["state"][i].items():
            assert torch.equal(value, rb["state"][i][key]), (i, key)
    assert [s.state_dict() for s in resumed.early_stopping] == [s.state_dict() for s in reference.early_stopping]
    # the logged history is the same, record for record (per-source parts, val_ema, the stop event)
    expected = [strip(r) for r in records(tmp_path / "ref")]
    assert [strip(r) for r in records(tmp_path / "run")] == expected
    first_train = next(r for r in expected if r["split"] == "train")
    assert {"pos/loss", "neg/loss", "pos/top", "neg/top"} <= set(first_train["parts"])
    assert any(r["split"] == "val_ema" for r in expected) and any(r.get("event") == "stop" for r in expected)
