"""The Trainer end to end: validation (when and how), the run folder, callbacks, history, optimizers, precision."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import cadence
from cadence import Callback, ConfigError
from cadence.optim import Lion
from helpers import (
    MLP,
    Events,
    IndexedMLP,
    SumMLP,
    assert_weights_changed,
    assert_weights_equal,
    clone,
    make_data,
    trainer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------- basics


def test_fit_trains_the_model_passed_in_and_returns_the_history():
    model = MLP()
    initial = clone(model)
    t = trainer(model, make_data(50), batch_size=8, max_steps=12, lr=1e-2, log_every=4)
    assert t.step == 0
    history = t.fit()
    assert t.step == 12
    assert t.model is model
    assert_weights_changed(initial, model)
    assert history is t.history
    assert [r["step"] for r in history if r["split"] == "train"] == [1, 4, 8, 12]  # step 1: output at once
    assert history["train/loss"] == [r["loss"] for r in history if r["split"] == "train"]
    assert history["lr"] == pytest.approx([1e-2] * 4)
    assert history.last("train") is history[-1]
    assert history.last("val") is None
    assert model.training


def test_loss_goes_down_on_a_learnable_task():
    t = trainer(MLP(), make_data(200), batch_size=20, max_steps=60, lr=1e-2, log_every=10)
    t.fit()
    losses = t.history["train/loss"]
    assert losses[-1] < 0.5 * losses[0]


def test_fit_again_after_the_end_does_nothing():
    model = MLP()
    t = trainer(model, make_data(20), batch_size=8, max_steps=4)
    t.fit()
    after = clone(model)
    records = len(t.history)
    t.fit()
    assert t.step == 4
    assert len(t.history) == records
    assert_weights_equal(model, after)


# ----------------------------------------------------------------------------------------------- validation
def val_steps(t) -> list[int]:
    return [r["step"] for r in t.history if r["split"] == "val"]


def test_validation_at_each_epoch_end_by_default():
    events = Events()
    # 20 items, batch 8: 3 steps per epoch
    t = trainer(MLP(), make_data(20), val_data=make_data(10, seed=1), batch_size=8, max_epochs=3, log_every=100,
                callbacks=[events])
    t.fit()
    assert val_steps(t) == [3, 6, 9]
    assert events.steps_of("on_validation_end") == [3, 6, 9]
    assert len(t.history["val/loss"]) == 3
    # the running train losses are logged just before each validation
    assert [(r["step"], r["split"]) for r in t.history if r["split"] != "train_epoch"] == [
        (1, "train"), (3, "train"), (3, "val"), (6, "train"), (6, "val"),
        (9, "train"), (9, "val")]
    assert [r["epoch"] for r in t.history if r["split"] == "val"] == [0, 1, 2]


def test_validation_every_val_every_steps_and_not_at_epoch_ends():
    t = trainer(MLP(), make_data(20), val_data=make_data(10, seed=1), batch_size=8, max_steps=12, val_every=4,
                log_every=100)
    t.fit()
    assert val_steps(t) == [4, 8, 12]


def test_final_weights_are_validated_when_the_run_ends_mid_epoch():
    t = trainer(MLP(), make_data(20), val_data=make_data(10, seed=1), batch_size=8, max_steps=7)
    t.fit()
    assert val_steps(t) == [3, 6, 7]


def test_validation_with_valid_frac_and_val_every():
    t = trainer(MLP(), make_data(40), valid_frac=0.25, batch_size=8, max_steps=6, val_every=3)
    t.fit()
    assert val_steps(t) == [3, 6]


class Probe(MLP):
    """Returns the mean loss and an accuracy part; records mode and grad state at each call."""

    def __init__(self) -> None:
        super().__init__(seed=5)
        self.states: list[tuple[bool, bool]] = []

    def forward(self, x, y):  # type: ignore[override]
        self.states.append((self.training, torch.is_grad_enabled()))
        logits = self.net(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}


def test_validate_returns_batch_size_weighted_means():
    x, y = make_data(10, seed=3)  # batches of 4, 4, 2: a plain mean of batch means would be wrong
    model = Probe()
    t = trainer(model, make_data(20), val_data=(x, y), batch_size=4, max_steps=1)
    metrics = t.validate()
    with torch.no_grad():
        logits = model.logits(x)
        per_item = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(1) == y).float()
    assert set(metrics) == {"val/loss", "val/acc"}
    assert metrics["val/loss"] == pytest.approx(per_item.mean().item(), rel=1e-6)
    assert metrics["val/acc"] == pytest.approx(correct.mean().item(), rel=1e-6)
    unweighted = torch.stack([per_item[:4].mean(), per_item[4:8].mean(), per_item[8:].mean()]).mean().item()
    assert metrics["val/loss"] != pytest.approx(unweighted, rel=1e-6)  # guard: the weighting matters here
    assert metrics["loss"] == metrics["val/loss"]  # a bare name finds val/<name>
    assert "acc" in metrics
    # logged as a val record, with the parts
    record = t.history.last("val")
    assert record["loss"] == metrics["val/loss"]
    assert record["parts"] == {"acc": metrics["val/acc"]}
    assert t.history["val/acc"] == [metrics["val/acc"]]


def test_validate_runs_in_eval_mode_without_grad_and_leaves_train_mode():
    model = Probe()
    t = trainer(model, make_data(20), val_data=make_data(10, seed=3), batch_size=4, max_steps=2)
    model.eval()
    t.validate()
    assert model.states == [(False, False)] * 3
    assert model.training
    assert all(m.training for m in model.modules())
    model.states.clear()
    t.fit()
    assert model.states[:2] == [(True, True)] * 2
    assert model.states[2:] == [(False, False)] * 3  # the validation at the end of the run
    assert model.training


def test_validate_restores_train_mode_after_an_error():
    class Fails(MLP):
        def forward(self, x, y):  # type: ignore[override]
            if not self.training:
                raise RuntimeError("boom")
            return super().forward(x, y)

    model = Fails()
    t = trainer(model, make_data(20), val_data=make_data(10), batch_size=4, max_steps=2)
    with pytest.raises(RuntimeError, match="boom"):
        t.validate()
    assert model.training


def test_validate_weights_summed_losses_by_num_items():
    x, y = make_data(10, seed=3)
    model = SumMLP()
    t = trainer(model, make_data(20), val_data=(x, y), batch_size=4, max_steps=1)
    metrics = t.validate()
    with torch.no_grad():
        expected = F.cross_entropy(model.logits(x), y).item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-6)


def test_validate_metric_functions_are_weighted_too():
    x, y = make_data(10, seed=3)
    model = MLP()

    def acc(out, batch):
        return (model.logits(batch[0]).argmax(1) == batch[1]).float().mean()

    t = trainer(model, make_data(20), val_data=(x, y), batch_size=4, max_steps=1, metrics={"acc": acc})
    metrics = t.validate()
    with torch.no_grad():
        expected = (model.logits(x).argmax(1) == y).float().mean().item()
    assert metrics["val/acc"] == pytest.approx(expected, rel=1e-6)


def test_validate_with_a_map_style_val_dataset():
    from helpers import PairDataset

    x, y = make_data(10, seed=3)
    model = MLP()
    t = trainer(model, make_data(20), val_data=PairDataset(x, y), batch_size=4, max_steps=1)
    with torch.no_grad():
        expected = F.cross_entropy(model.logits(x), y).item()
    assert t.validate()["val/loss"] == pytest.approx(expected, rel=1e-6)


def test_validate_in_memory_leaves_the_global_rng_alone():
    t = trainer(MLP(), make_data(20), val_data=make_data(10, seed=1), batch_size=4, max_steps=1)
    state = torch.get_rng_state()
    t.validate()
    assert torch.equal(state, torch.get_rng_state())


def test_validate_map_style_leaves_the_global_rng_alone():
    """The validation DataLoader cadence builds draws its base seed from a private generator."""
    from helpers import PairDataset

    t = trainer(MLP(), make_data(20), val_data=PairDataset(*make_data(10, seed=1)), batch_size=4, max_steps=1)
    state = torch.get_rng_state()
    t.validate()
    assert torch.equal(state, torch.get_rng_state())


def test_map_style_validation_does_not_change_training():
    """Validating (eval mode, no dropout) must not change what a model with dropout trains to."""
    from helpers import PairDataset

    class Dropout(MLP):
        def __init__(self):
            super().__init__(seed=6)
            self.net.insert(2, nn.Dropout(0.3))

    x, y = make_data(48)
    validated, plain = Dropout(), Dropout()
    kw = dict(batch_size=16, max_epochs=3, lr=1e-2)
    trainer(validated, (x, y), val_data=PairDataset(*make_data(10, seed=1)), **kw).fit()
    trainer(plain, (x, y), **kw).fit()
    assert_weights_equal(validated, plain)


def test_in_memory_validation_does_not_change_training():
    """The same check with in-memory validation data: validation draws no random numbers."""

    class Dropout(MLP):
        def __init__(self):
            super().__init__(seed=6)
            self.net.insert(2, nn.Dropout(0.3))

    x, y = make_data(48)
    validated, plain = Dropout(), Dropout()
    kw = dict(batch_size=16, max_epochs=3, lr=1e-2)
    trainer(validated, (x, y), val_data=make_data(10, seed=1), **kw).fit()
    trainer(plain, (x, y), **kw).fit()
    assert_weights_equal(validated, plain)


# ----------------------------------------------------------------------------------------------- run folder
TRAIN_KEYS = {"step", "epoch", "split", "loss", "parts", "lr", "samples_per_s", "elapsed_s"}


def test_run_dir_writes_metrics_and_final_weights(tmp_path):
    run = tmp_path / "run"
    model = MLP()
    t = trainer(model, make_data(30), val_data=make_data(10, seed=1), batch_size=8, max_steps=9, log_every=2,
                max_grad_norm=1.0, run_dir=run)
    t.fit()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == json.loads(json.dumps(list(t.history)))  # one line per log point, as in the history
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8, 9]  # step 1, every log point (4 and 8 end epochs)
    assert [r["step"] for r in val] == [4, 8, 9]  # epoch ends (4 steps each) and the end of the run
    for r in train:
        assert TRAIN_KEYS <= set(r)
        assert isinstance(r["loss"], float) and r["loss"] > 0
        assert isinstance(r["parts"], dict)
        assert r["lr"] == pytest.approx(1e-3)
        assert r["samples_per_s"] > 0 and r["elapsed_s"] >= 0
    assert len(t.history["train/grad_norm"]) == len(train)  # clipping logs the norm
    assert [r["epoch"] for r in train] == [0, 0, 0, 1, 1, 2]
    for r in val:
        assert {"step", "epoch", "split", "loss", "parts"} <= set(r)

    weights = load_file(str(run / "final" / "model.safetensors"))
    state = model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)
    fresh = MLP(seed=123)
    fresh.load_state_dict(weights)
    assert_weights_equal(fresh, model)


def test_run_dir_refuses_an_earlier_run(tmp_path):
    run = tmp_path / "run"
    trainer(MLP(), make_data(20), batch_size=8, max_steps=2, log_every=1, run_dir=run).fit()
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as info:
        trainer(MLP(), make_data(20), batch_size=8, max_steps=2, run_dir=run)
    message = str(info.value)
    assert f"run_dir={str(run)!r}" in message
    assert "resume" in message and "overwrite" in message
    assert (run / "metrics.jsonl").read_text() == before


def test_run_dir_overwrite_replaces_the_earlier_run(tmp_path):
    run = tmp_path / "run"
    trainer(MLP(seed=1), make_data(20), batch_size=8, max_steps=5, log_every=1, run_dir=run).fit()
    (run / "notes.txt").write_text("mine")
    model = MLP(seed=2)
    t = trainer(model, make_data(20), batch_size=8, max_steps=2, log_every=1, run_dir=run, overwrite=True)
    t.fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # only the new run's records
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert (run / "notes.txt").read_text() == "mine"  # only what cadence wrote is removed


def test_run_dir_with_other_files_is_accepted(tmp_path):
    (tmp_path / "config.yaml").write_text("x: 1")
    trainer(MLP(), make_data(20), batch_size=8, max_steps=2, run_dir=tmp_path).fit()
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"run_dir=.*file"):
        trainer(MLP(), make_data(20), batch_size=8, max_steps=2, run_dir=path)


def test_no_run_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer(MLP(), make_data(20), batch_size=8, max_steps=2).fit()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- callbacks
def test_callback_events_in_order(tmp_path):
    events = Events()
    t = trainer(MLP(), make_data(20), val_data=make_data(6, seed=1), batch_size=8, max_epochs=2, log_every=2,
                callbacks=[events])
    t.fit()
    names = [e for e, _ in events.calls]
    assert names[0] == "on_fit_start" and events.calls[0] == ("on_fit_start", 0)
    assert events.calls[-1] == ("on_fit_end", 6)
    assert names.count("on_fit_start") == names.count("on_fit_end") == 1
    assert events.steps_of("on_step_end") == [1, 2, 3, 4, 5, 6]
    assert events.steps_of("on_validation_end") == [3, 6]
    assert events.logs == list(t.history)  # on_log gets every record, train and val
    assert all(a is b for a, b in zip(events.logs, t.history))
    assert [m["val/loss"] for m in events.val_metrics] == t.history["val/loss"]
    # on_validation_end follows the val record's on_log, and both follow that step's on_step_end
    at3 = [e for e, s in events.calls if s == 3]
    # (the epoch summary, the train record, the val record)
    assert at3 == ["on_step_end", "on_log", "on_log", "on_log", "on_validation_end"]


def test_callback_subclass_with_some_events_only():
    class Counter(Callback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, trainer):
            self.steps += 1

    counter = Counter()
    trainer(MLP(), make_data(20), batch_size=8, max_steps=5, callbacks=[counter]).fit()
    assert counter.steps == 5
    assert cadence.Callback is Callback


@pytest.mark.parametrize("stop_at", [1, 3])
def test_should_stop_from_on_step_end(stop_at):
    events = Events()

    class Stop:
        def on_step_end(self, trainer):
            if trainer.step == stop_at:
                trainer.should_stop = True

    t = trainer(MLP(), make_data(20), batch_size=4, max_steps=50, log_every=100, callbacks=[Stop(), events])
    t.fit()
    assert t.step == stop_at
    assert events.steps_of("on_step_end") == list(range(1, stop_at + 1))
    assert events.steps_of("on_fit_end") == [stop_at]
    assert [r["step"] for r in t.history] == sorted({1, stop_at})  # step 1, then the partial window


def test_should_stop_from_on_fit_start_trains_nothing():
    model = MLP()
    initial = clone(model)

    class Stop:
        def on_fit_start(self, trainer):
            trainer.should_stop = True

    t = trainer(model, make_data(20), batch_size=4, max_steps=5, callbacks=[Stop()])
    t.fit()
    assert t.step == 0
    assert_weights_equal(model, initial)


def test_early_stopping_from_on_validation_end():
    class EarlyStop:
        def on_validation_end(self, trainer, metrics):
            assert "val/loss" in metrics
            trainer.should_stop = True

    t = trainer(MLP(), make_data(20), val_data=make_data(8, seed=1), batch_size=8, max_epochs=5,
                callbacks=[EarlyStop()])
    t.fit()
    assert t.step == 3  # stopped after the first epoch's validation
    assert val_steps(t) == [3]


def test_on_fit_end_sees_the_final_weights_on_disk(tmp_path):
    seen = {}

    class End:
        def on_fit_end(self, trainer):
            path = tmp_path / "final" / "model.safetensors"
            seen["exists"] = path.exists()
            seen["equal"] = path.exists() and all(
                torch.equal(v, trainer.model.state_dict()[k]) for k, v in load_file(str(path)).items())

    trainer(MLP(), make_data(20), batch_size=8, max_steps=3, run_dir=tmp_path, callbacks=[End()]).fit()
    assert seen == {"exists": True, "equal": True}


# ----------------------------------------------------------------------------------------------- optimizers
class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 2)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)

    def forward(self, x, y):
        return F.cross_entropy(self.head(self.frozen(self.norm(self.emb(x)))), y)


def test_param_groups_decay_only_matrices_and_skip_frozen():
    model = WithNorm()
    decay, no_decay = trainer(model, make_data(20), batch_size=8, max_steps=2, weight_decay=0.1).optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.emb.weight), id(model.head.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.emb.bias), id(model.norm.weight), id(model.norm.bias),
                                                     id(model.head.bias)}


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion", "AdamW"])
def test_optimizers_by_name_train_and_leave_frozen_alone(name):
    model = WithNorm()
    initial = clone(model)
    t = trainer(model, make_data(20), batch_size=8, max_steps=3, optimizer=name, lr=1e-2, weight_decay=0.1)
    trained = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert id(model.frozen.weight) not in trained and id(model.frozen.bias) not in trained
    t.fit()
    assert torch.equal(model.frozen.weight, initial.frozen.weight)
    assert not torch.equal(model.emb.weight, initial.emb.weight)
    assert not torch.equal(model.norm.bias, initial.norm.bias)


def test_optimizer_callable_gets_the_param_groups():
    got = {}

    def make(groups):
        got["groups"] = groups
        return torch.optim.SGD(groups, lr=0.1)

    model = MLP()
    t = trainer(model, make_data(20), batch_size=8, max_steps=2, optimizer=make, lr=0.1, weight_decay=0.5)
    assert isinstance(t.optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in got["groups"]] == [0.5, 0.0]
    t.fit()


def test_optimizer_instance_is_used_as_is():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t = trainer(model, make_data(20), batch_size=8, max_steps=2, optimizer=opt, lr=0.05)
    assert t.optimizer is opt
    t.fit()
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_params_are_the_models_in_order_then_other_tensors_the_optimizer_trains():
    """Clipping (and the num_items division) covers every trained tensor, the model's in their own order."""
    model = MLP()
    scale = torch.nn.Parameter(torch.ones(()))  # trained alongside the model, not part of it
    opt = torch.optim.SGD([{"params": [scale]}, {"params": list(model.parameters())[::-1]}], lr=0.05)
    forward = lambda m, batch: m(*batch) * scale  # noqa: E731
    t = trainer(model, make_data(20), batch_size=8, max_steps=2, optimizer=opt, forward=forward, max_grad_norm=0.1)
    assert [id(q) for q in t.params] == [id(q) for q in model.parameters()] + [id(scale)]
    t.fit()
    assert not torch.equal(scale.detach(), torch.ones(()))


def test_lion_update_matches_its_formula():
    torch.manual_seed(0)
    p = torch.randn(4, 3, requires_grad=True)
    start = p.detach().clone()
    m = torch.randn(4, 3)
    g = torch.randn(4, 3)
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    opt.state[p]["exp_avg"] = m.clone()
    p.grad = g.clone()
    opt.step()
    expected = start * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.99 * m + 0.01 * g)
    with pytest.raises(ConfigError, match="betas"):
        Lion([p], betas=(1.0, 0.99))


# ----------------------------------------------------------------------------------------------- precision
def test_bf16_autocast_trains_on_cpu_and_keeps_fp32_weights():
    model = MLP()
    initial = clone(model)
    t = trainer(model, make_data(20), batch_size=8, max_steps=3, precision="bf16", lr=1e-2, log_every=1)
    t.fit()
    assert_weights_changed(initial, model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(isinstance(v, float) for v in t.history["train/loss"])


def test_grad_norm_is_logged_when_clipping():
    model = MLP()
    t = trainer(model, make_data(16), batch_size=16, max_steps=1, max_grad_norm=1e-3, log_every=1,
                optimizer="sgd", lr=0.1)
    reference = clone(model)
    t.fit()
    x, y = make_data(16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    reference(x[perm], y[perm]).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1e-3)
    assert t.history["train/grad_norm"] == [pytest.approx(norm.item(), rel=1e-5)]


def test_indexed_model_helper_records_only_training_batches():
    """Guard for the helper many order tests rely on."""
    model = IndexedMLP()
    t = trainer(model, (*make_data(8), torch.arange(8)), val_data=(*make_data(4), torch.arange(4)), batch_size=4,
                max_steps=2)
    t.fit()
    assert sum(len(s) for s in model.seen) == 8
    assert sum(len(s) for s in model.seen_eval) == 4


@pytest.mark.parametrize("name", ["32", "fp32", "32-true", "bf16", "bf16-mixed"])
def test_precision_names_accepted_on_cpu(name):
    t = trainer(MLP(), make_data(16), batch_size=8, max_steps=1, precision=name)
    t.fit()
    assert t.step == 1


@pytest.mark.parametrize("name", ["16", "fp16", "16-mixed"])
def test_fp16_names_refused_on_cpu(name):
    with pytest.raises(ConfigError, match=rf"precision='{name}'.*bf16"):
        trainer(MLP(), make_data(16), batch_size=8, max_steps=1, precision=name)


def test_device_as_torch_device():
    t = trainer(MLP(), make_data(16), batch_size=8, max_steps=1, device=torch.device("cpu"))
    assert t.device == torch.device("cpu")


def test_auto_device_picks_cpu_here():
    if torch.cuda.is_available() or (torch.backends.mps.is_available()):
        pytest.skip("an accelerator is available here")
    assert trainer(MLP(), make_data(16), batch_size=8, max_steps=1, device="auto").device.type == "cpu"


# ----------------------------------------------------------------------------------------------- progress
def test_progress_false_prints_nothing(capsys):
    trainer(MLP(), make_data(20), val_data=make_data(8), batch_size=4, max_steps=6, log_every=2).fit()
    assert capsys.readouterr().out == ""


def test_progress_prints_a_line_per_log_point_when_not_a_terminal(capsys):
    trainer(MLP(), make_data(20), batch_size=4, max_steps=6, log_every=2, progress=True).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/6", "2/6", "4/6", "6/6"]
    assert all("loss=" in line for line in lines)


# ----------------------------------------------------------------------------------------------- val_at_start
def test_val_at_start_validates_the_untrained_model_at_step_0():
    x, y = make_data(20)
    val = make_data(10, seed=1)
    model = MLP(seed=3)
    expected = trainer(clone(model), (x, y), val_data=val, max_steps=1).validate()["val/loss"]
    t = trainer(model, (x, y), val_data=val, batch_size=8, max_steps=4, val_every=2, val_at_start=True)
    t.fit()
    checks = [r for r in t.history if r["split"] == "val"]
    assert [r["step"] for r in checks] == [0, 2, 4]
    assert checks[0]["loss"] == expected != checks[1]["loss"]
    plain = trainer(MLP(seed=3), (x, y), val_data=val, batch_size=8, max_steps=4, val_every=2)
    plain.fit()
    assert [r["step"] for r in plain.history if r["split"] == "val"] == [2, 4]  # off by default
    with pytest.raises(ConfigError, match="val_at_start=True.*val_data"):
        trainer(MLP(), (x, y), max_steps=2, val_at_start=True)


def test_val_at_start_is_not_repeated_on_resume(tmp_path):
    from cadence.runs import read_records

    data, val, run = make_data(20), make_data(10, seed=1), tmp_path / "run"
    kw = dict(val_data=val, batch_size=8, val_every=2, val_at_start=True, run_dir=run, checkpoint_every=2)
    trainer(MLP(), data, max_steps=2, **kw).fit()
    resumed = trainer(MLP(), data, max_steps=4, resume="auto", **kw)
    resumed.fit()
    assert [r["step"] for r in read_records(run) if r["split"] == "val"] == [0, 2, 4]
    assert [r["step"] for r in resumed.history if r["split"] == "val"] == [0, 2, 4]


# ----------------------------------------------------------------------------------------------- epoch
def test_epoch_is_public_read_only_and_the_records_epoch():
    seen = []

    class Epochs(Callback):
        def on_epoch_start(self, trainer):
            seen.append(("start", trainer.step, trainer.epoch))

        def on_step_end(self, trainer):
            seen.append(("step", trainer.step, trainer.epoch))

    t = trainer(MLP(), make_data(32), batch_size=8, max_epochs=3, log_every=1, callbacks=[Epochs()])
    assert t.epoch == 0
    t.fit()
    steps = [(s, e) for kind, s, e in seen if kind == "step"]
    assert steps == [(s, (s - 1) // 4) for s in range(1, 13)]  # 4 steps an epoch
    assert [(s, e) for kind, s, e in seen if kind == "start"] == [(0, 0), (4, 0), (8, 1)]
    assert {r["step"]: r["epoch"] for r in t.history if r["split"] == "train"} == dict(steps)
    assert t.epoch == 2
    with pytest.raises(AttributeError):
        t.epoch = 5
