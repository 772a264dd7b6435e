"""The Trainer's explicit state (``state_dict``/``load_state_dict``) and state that lives across steps:
callbacks', datasets' and models' own state, saved in every checkpoint (tensors as safetensors, the rest as
JSON) and restored on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadence import ConfigError
from cadence.checkpoint import tree
from helpers import MLP, CrashAt, PairDataset, assert_weights_equal, make_data, trainer

ROOT = Path(__file__).resolve().parents[1]


class Tally:
    """A callback whose state holds a tensor, a list, a tuple and None."""

    def __init__(self) -> None:
        self.total = torch.zeros(3)
        self.steps: list[int] = []
        self.pair = (1, "a")
        self.nothing = None

    def on_step_end(self, trainer) -> None:
        self.total += trainer.step
        self.steps.append(trainer.step)

    def state_dict(self) -> dict:
        return {"total": self.total.clone(), "steps": list(self.steps), "pair": self.pair, "nothing": self.nothing}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.steps, self.pair, self.nothing = state["total"], state["steps"], state["pair"], None


class Counting(PairDataset):
    """A map-style dataset with state of its own (how many epochs it was told about)."""

    def __init__(self, *tensors) -> None:
        super().__init__(*tensors)
        self.level = torch.tensor([0.0])

    def state_dict(self) -> dict:
        return {"level": self.level.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.level = state["level"]


def test_tree_split_and_join_round_trip():
    state = {"a": torch.arange(3), "b": [1, 2.5, "x", None, True, (torch.ones(2), 3)], "c": {"d": {}}}
    meta, tensors = tree.split(state, "cb")
    assert json.loads(json.dumps(meta)) == meta and set(tensors) == {"cb/a", "cb/b/5/0"}
    back = tree.join(meta, tensors)
    assert torch.equal(back["a"], state["a"]) and back["b"][:5] == state["b"][:5] and back["c"] == {"d": {}}
    assert isinstance(back["b"][5], tuple) and torch.equal(back["b"][5][0], torch.ones(2))


@pytest.mark.parametrize("value, found", [({1: 2}, "key 1"), (object(), "holds a object"), ({"s": {1, 2}}, "set")])
def test_state_that_a_checkpoint_cannot_hold_is_named(value, found):
    with pytest.raises(ConfigError, match=found) as err:
        tree.split({"x": value}, "callbacks/0")
    assert "callbacks/0/x" in str(err.value)


def test_callback_tensor_state_survives_a_crash_and_resume(tmp_path):
    x, y = make_data(48)
    tally = Tally()
    t = trainer(MLP(), (x, y), batch_size=8, max_steps=10, run_dir=tmp_path, checkpoint_every=3,
                callbacks=[tally, CrashAt(5)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.fit()
    saved = load_file(tmp_path / "checkpoints" / "step-000000003" / "state.safetensors")
    assert torch.equal(saved["state/callbacks/0/total"], torch.full((3,), 6.0))
    resumed = Tally()
    t2 = trainer(MLP(), (x, y), batch_size=8, max_steps=10, run_dir=tmp_path, checkpoint_every=3,
                 callbacks=[resumed], resume="auto")
    t2.fit()
    assert resumed.steps == list(range(1, 11)) and resumed.pair == (1, "a")
    assert torch.equal(resumed.total, torch.full((3,), float(sum(range(1, 11)))))


def test_a_callback_state_a_checkpoint_cannot_hold_fails_the_first_save_clearly(tmp_path):
    class Bad:
        def state_dict(self):
            return {"model": MLP()}

        def load_state_dict(self, state):
            pass

    t = trainer(MLP(), make_data(16), batch_size=8, max_steps=2, run_dir=tmp_path, checkpoint_every=1,
                callbacks=[Bad()])
    with pytest.raises(ConfigError, match=r"callbacks/0/model: the state holds a MLP"):
        t.fit()


def test_dataset_state_is_checkpointed(tmp_path):
    data = Counting(*make_data(32))
    t = trainer(MLP(), data, batch_size=8, max_steps=4, run_dir=tmp_path, checkpoint_every=2)
    data.level += 7
    t.fit()
    again = Counting(*make_data(32))
    t2 = trainer(MLP(), again, batch_size=8, max_steps=4, run_dir=tmp_path, resume="auto")
    t2.fit()  # a finished run: resuming loads the last checkpoint and trains nothing more
    assert torch.equal(again.level, torch.tensor([7.0]))


def test_trainer_state_dict_round_trips_into_a_fresh_trainer():
    x, y = make_data(40)
    a = trainer(MLP(), (x, y), batch_size=8, max_steps=7, val_data=(x[:8], y[:8]), val_every=3)
    a.fit()
    state = a.state_dict()
    assert {"step", "data", "records", "running", "callbacks", "datasets", "model", "ema"} <= set(state)
    b = trainer(MLP(), (x, y), batch_size=8, max_steps=7, val_data=(x[:8], y[:8]), val_every=3)
    b.load_state_dict(state)
    assert b.step == 7 and b.stream.state_dict() == a.stream.state_dict()
    assert b.last_val_metrics == a.last_val_metrics


# ------------------------------------------------------------------------------- the TBPTT LSTM example
DRIVER = """
import os, signal, sys
sys.path.insert(0, {examples!r})
import torch
from lstm_lm import build
from safetensors.torch import save_file

class Kill:
    def on_step_end(self, trainer):
        if trainer.step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

torch.set_num_threads(1)
t = build({run!r}, steps={steps}, resume={resume}, callbacks=[Kill()] if {kill_at} else [], progress=False,
          device="cpu")
t.fit()
save_file({{k: v.contiguous() for k, v in t.model.state_dict().items() if torch.is_tensor(v)}}, {out!r})
"""


def drive(tmp_path: Path, run: Path, out: Path, *, kill_at: int = 0, resume: bool = False, steps: int = 40):
    code = DRIVER.format(examples=str(ROOT / "examples"), run=str(run), out=str(out), kill_at=kill_at,
                         resume=resume, steps=steps)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


def test_tbptt_lstm_resumes_bitwise_after_sigkill(tmp_path):
    """The example's hidden state (carried between batches) is in the checkpoint: SIGKILL at step 25 (the last
    checkpoint is step 20, after a validation), resume, and the weights are those of an uninterrupted run."""
    whole = drive(tmp_path, tmp_path / "whole", tmp_path / "whole.safetensors")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = drive(tmp_path, tmp_path / "cut", tmp_path / "unused.safetensors", kill_at=25)
    assert killed.returncode == -signal.SIGKILL
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "step-000000020" / "trainer.json").read_text())
    assert meta["model"]["_extra_state"]["hidden"] is not None  # the carried state is in the checkpoint
    resumed = drive(tmp_path, tmp_path / "cut", tmp_path / "resumed.safetensors", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_extra_state_stays_out_of_the_weights_files(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from lstm_lm import build
    finally:
        sys.path.remove(str(ROOT / "examples"))
    t = build(str(tmp_path), steps=10, progress=False, device="cpu")
    t.fit()
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert not any("extra_state" in k for k in weights) and "rnn.weight_ih_l0" in weights
    fresh = build(None, steps=10, progress=False, device="cpu")
    fresh.model.load_state_dict(t.model.state_dict())  # the weights and the hidden state, as torch does it
    assert_weights_equal(fresh.model.rnn, t.model.rnn)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.hidden, t.model.hidden))
