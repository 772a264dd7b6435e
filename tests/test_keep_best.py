"""keep_best keeps the weights that were validated: a checkpoint is saved at every validation that is the best
so far, also when validations and checkpoint_every fall on different steps (cadence/checkpoint/store.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cadence import Callback
from cadence.cli.main import main
from helpers import MLP, assert_weights_equal, make_data, trainer


class ValidatedWeights(Callback):
    """The model's weights at every validation, by step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer, metrics) -> None:
        self.weights[trainer.step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def checkpoints(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in sorted((run / "checkpoints").glob("step-*"))]


def run_with(run: Path, mode: str = "min", **kw):
    x, y = make_data(48)
    vx, vy = make_data(16, seed=1)
    seen = ValidatedWeights()
    kw = {"max_steps": 15, "keep_last": 1, **kw}
    # validating on flipped labels: the better the model learns, the worse val/loss gets
    t = trainer(MLP(), (x, y), val_data=(vx, 1 - vy), batch_size=8, lr=0.02, val_every=3, checkpoint_every=5,
                keep_best=("val/loss", mode), run_dir=run, callbacks=[seen], **kw)
    t.fit()
    val = {r["step"]: r["loss"] for r in t.history if r["split"] == "val"}
    return t, seen, val


def test_the_best_checkpoint_holds_the_weights_that_were_validated(tmp_path):
    run = tmp_path / "run"
    t, seen, val = run_with(run)
    best = min(val, key=val.get)
    assert best % 5 != 0, "the test needs the best validation between two checkpoint_every saves"
    assert t.best_checkpoint == run / "checkpoints" / f"step-{best:09d}"
    saved = load_file(t.best_checkpoint / "model.safetensors")
    assert saved.keys() == seen.weights[best].keys()
    for k in saved:
        assert torch.equal(saved[k], seen.weights[best][k]), k
    # keep_last=1 keeps the newest periodic checkpoint; the best-only one stays while it is the best
    assert checkpoints(run) == sorted({best, 15})
    manifest = json.loads((t.best_checkpoint / "manifest.json").read_text())
    assert manifest.get("kept_for") == "best"
    # cadence export --best gives the same weights
    out = tmp_path / "best.safetensors"
    assert main(["export", str(run), "--best", "-o", str(out)]) == 0
    exported = load_file(out)
    assert all(torch.equal(exported[k], seen.weights[best][k]) for k in seen.weights[best])


def test_improving_validations_each_save_and_superseded_ones_are_removed(tmp_path):
    run = tmp_path / "run"
    t, seen, val = run_with(run, mode="max", keep_last=None)  # val/loss rises: every validation is the best
    assert sorted(val) == [3, 6, 9, 12, 15] and val[15] == max(val.values())
    assert t.best_checkpoint == run / "checkpoints" / f"step-{15:09d}"
    # keep_last=None keeps every periodic checkpoint; best-only saves at 3, 6, 9, 12 were each superseded
    assert checkpoints(run) == [5, 10, 15]


def test_a_checkpoint_saved_at_a_best_validation_resumes_bitwise(tmp_path):
    reference, _, val = run_with(tmp_path / "ref", keep_last=None)
    best = min(val, key=val.get)
    assert best % 5 != 0
    run = tmp_path / "run"
    run_with(run, keep_last=None, max_steps=best)  # ends at the best validation, saved there
    assert checkpoints(run)[-1] == best
    x, y = make_data(48)
    vx, vy = make_data(16, seed=1)
    resumed = trainer(MLP(seed=1), (x, y), val_data=(vx, 1 - vy), batch_size=8, lr=0.02, val_every=3,
                      checkpoint_every=5, keep_best=("val/loss", "min"), run_dir=run, resume="auto", max_steps=15)
    resumed.fit()
    assert_weights_equal(resumed.model, reference.model)
    assert resumed.best_checkpoint.name == reference.best_checkpoint.name
