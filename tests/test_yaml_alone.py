"""``cadence fit`` from a YAML file alone (issue 25): the seeds' shapes of code, with no Python of one's own.

The classes in ``seedlike.py`` carry no type hints, compute a loss outside any module, return ``(logits, loss)``,
``(loss, aux)`` or vector parts, draw from ``random`` in their constructor, and split by their own function;
each is trained here by the CLI's ``main`` from a config file, and each mistake gets a message that names the
argument and the form it takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cadence.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

TRUNK = {"class_path": "seedlike.Trunk", "init_args": {"dim": 4, "hidden": 8}}
DATA = {"class_path": "seedlike.Points", "init_args": {"n": 64}}


def config(tmp_path: Path, model: dict, data: dict | None = None, **trainer) -> Path:
    cfg = {"model": model, "data": data or DATA,
           "trainer": {"max_steps": 4, "batch_size": 16, "progress": False, "log_every": 1, **trainer}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(tmp_path: Path, model: dict, data: dict | None = None, name: str = "run", **trainer) -> Path:
    run = tmp_path / name
    assert main(["fit", "--config", str(config(tmp_path, model, data, **trainer)), "--run-dir", str(run)]) == 0
    return run


def records(run: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def error(tmp_path: Path, capsys, model: dict, *args: str, data: dict | None = None, started: bool = False,
          **trainer) -> str:
    """The message of a run that fails; before it starts (``started=False``) no run folder is left."""
    path = config(tmp_path, model, data, **trainer)
    assert main(["fit", "--config", str(path), "--run-dir", str(tmp_path / "bad"), *args]) == 2
    assert (tmp_path / "bad").exists() == started
    return capsys.readouterr().err.strip()


def classifier(cls: str = "seedlike.Classifier", **init) -> dict:
    return {"class_path": cls, "init_args": {"trunk": TRUNK, "classes": 3, **init}}


# ------------------------------------------------------------------------------------ untyped constructors
def test_untyped_model_with_a_nested_class_path_trains(tmp_path: Path) -> None:
    run = fit(tmp_path, classifier())
    weights = load_file(run / "final" / "model.safetensors")
    assert set(weights) == {"trunk.net.0.weight", "trunk.net.0.bias", "head.weight", "head.bias"}
    assert len(records(run)) == 4


def test_untyped_data_with_a_nested_class_path_and_an_untyped_callback(tmp_path: Path) -> None:
    data = {"class_path": "seedlike.Repeat", "init_args": {"base": DATA, "times": 2}}
    run = fit(tmp_path, classifier(), data, max_steps=None, max_epochs=1)
    assert records(run)[-1]["step"] == 128 // 16


def test_a_required_untyped_argument_left_out_is_named(tmp_path: Path, capsys) -> None:
    message = error(tmp_path, capsys, {"class_path": "seedlike.Classifier", "init_args": {"trunk": TRUNK}})
    assert "model.init_args: seedlike.Classifier needs classes" in message and "--model.init_args.classes" in message
    nested = {"class_path": "seedlike.Trunk", "init_args": {"dim": 4}}
    message = error(tmp_path, capsys, classifier(trunk=nested))
    assert "model.init_args.trunk.init_args: seedlike.Trunk needs hidden" in message


def test_a_value_the_class_cannot_use_names_the_argument_and_the_class(tmp_path: Path, capsys) -> None:
    bad_trunk = {"class_path": "seedlike.Trunk", "init_args": {"dim": "four", "hidden": 8}}
    message = error(tmp_path, capsys, classifier(trunk=bad_trunk))
    assert message.startswith("cadence: error: model.init_args.trunk: seedlike.Trunk(dim='four', hidden=8) failed")
    assert "TypeError" in message and "fix the value" in message
    typed = {"class_path": "torch.nn.Linear", "init_args": {"in_features": "four", "out_features": 8}}
    message = error(tmp_path, capsys, classifier(trunk=typed))
    assert "model.init_args.trunk: torch.nn.Linear(in_features='four', out_features=8) failed" in message


@pytest.mark.parametrize("args, expected", [
    (["--model", "3"], "model='3': expected a class as class_path + init_args, e.g. {class_path: my_module.MyModel"),
    (["--trainer.forward_kwargs", "3"], "trainer.forward_kwargs='3': expected a mapping of names to values"),
    (["--trainer.keep_best", "val/loss"], "trainer.keep_best='val/loss': expected a list of 2 values, e.g. "
                                          "[val/loss, min] or null"),
    (["--trainer.split_by", "3", "--trainer.valid_frac", "0.25"],
     "a dotted path to a function (my_module.my_function) or a callable class"),
    (["--trainer.metrics", "3"], "trainer.metrics='3': expected a mapping of names to values"),
])
def test_no_message_says_expected_none(tmp_path: Path, capsys, args: list[str], expected: str) -> None:
    message = error(tmp_path, capsys, classifier(), *args)
    assert expected in message and "expected None" not in message


# ------------------------------------------------------------------------------------ callables by path
def test_an_untyped_function_for_split_by_balance_by_collate_and_metrics(tmp_path: Path) -> None:
    run = fit(tmp_path, classifier("seedlike.LogitsAndLoss"), loss_index=1, valid_frac=0.25,
              split_by="seedlike.label_of", split_mode="stratified", sampler="balanced",
              balance_by="seedlike.label_of", collate_fn="torch.utils.data.default_collate",
              metrics={"acc": "seedlike.accuracy"}, val_every=2)
    val = records(run, "val")
    assert [r["step"] for r in val] == [2, 4] and 0.0 <= val[-1]["parts"]["acc"] <= 1.0


def test_a_schedule_and_an_optimizer_by_dotted_path(tmp_path: Path) -> None:
    run = fit(tmp_path, classifier(), schedule="seedlike.halving", optimizer="seedlike.sgd", lr=0.1)
    assert [r["lr"] for r in records(run)] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    # the same from the command line
    path = config(tmp_path, classifier())
    assert main(["fit", "--config", str(path), "--run-dir", str(tmp_path / "cli"), "--trainer.schedule",
                 "seedlike.halving", "--trainer.optimizer", "seedlike.sgd", "--trainer.lr", "0.1"]) == 0
    assert [r["lr"] for r in records(tmp_path / "cli")] == [r["lr"] for r in records(run)]


def test_a_dotted_path_that_does_not_import_says_why(tmp_path: Path, capsys) -> None:
    message = error(tmp_path, capsys, classifier(), schedule="seedlike.no_such_schedule")
    assert "seedlike.no_such_schedule" in message and "has no 'no_such_schedule'" in message


def test_a_loss_outside_any_module(tmp_path: Path) -> None:
    model = {"class_path": "seedlike.NoForward", "init_args": {"dim": 4, "classes": 3}}
    run = fit(tmp_path, model, forward="seedlike.single_batch_loss")
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == 4 and losses[-1] < losses[0] + 1.0
    assert not torch.equal(load_file(run / "final" / "model.safetensors")["encoder.weight"],
                           _initial("seedlike.NoForward"))


def _initial(path: str) -> torch.Tensor:
    from seedlike import NoForward

    torch.manual_seed(0)
    return NoForward(4, 3).encoder.weight.detach()


# ------------------------------------------------------------------------------------ model outputs
def test_logits_then_loss_with_loss_index(tmp_path: Path, capsys) -> None:
    run = fit(tmp_path, classifier("seedlike.LogitsAndLoss"), loss_index=1)
    assert all(r["parts"] == {} for r in records(run))  # the logits are no part
    message = error(tmp_path, capsys, classifier("seedlike.LogitsAndLoss"), started=True)
    assert "model output" in message  # without loss_index the tuple is not (loss, parts)


def test_loss_and_an_aux_tensor(tmp_path: Path) -> None:
    run = fit(tmp_path, classifier("seedlike.WithAux"), part_names=["aux"], val_every=2, valid_frac=0.25)
    assert all(set(r["parts"]) == {"aux"} for r in records(run) + records(run, "val"))


def test_vector_parts_are_logged_as_their_sum(tmp_path: Path) -> None:
    run = fit(tmp_path, classifier("seedlike.Quantized"), part_names=["recon", "commit"], log_every=1)
    for r in records(run):
        assert r["loss"] == pytest.approx(r["parts"]["recon"] + r["parts"]["commit"], rel=1e-5)


# ------------------------------------------------------------------------------------ splits and seeding
def test_torch_split_holds_out_what_the_seeds_hold_out(tmp_path: Path) -> None:
    from torch.utils.data import random_split

    from cadence import Trainer
    from seedlike import Classifier, Points, Trunk

    data = {"class_path": "seedlike.Points", "init_args": {"n": 70}}
    run = fit(tmp_path, classifier(), data, valid_frac=0.1, split_mode="torch", split_seed=42, val_every=4)
    assert len(records(run, "val")) == 1
    train_size = int(0.9 * 70)  # as MuLaN and soundstorm compute it: 63, so 7 held out (int(0.1 * 70) = 6)
    _, ref_val = random_split(range(70), [train_size, 70 - train_size], generator=torch.Generator().manual_seed(42))
    t = Trainer(Classifier(Trunk(4, 8), 3), Points(70), valid_frac=0.1, split_mode="torch", split_seed=42,
                max_steps=1, progress=False)
    assert len(ref_val) == 7 and list(t.val_data.indices) == list(ref_val.indices)


def test_a_seeds_own_split_by_function(tmp_path: Path) -> None:
    from cadence import Trainer
    from seedlike import Classifier, Points, Trunk, every_fourth

    run = fit(tmp_path, classifier(), val_indices="seedlike.every_fourth", val_every=4)
    t = Trainer(Classifier(Trunk(4, 8), 3), Points(64), val_indices=every_fourth, max_steps=1, progress=False)
    assert sorted(t.val_data.indices) == list(range(0, 64, 4))
    assert len(records(run, "val")) == 1


def test_two_runs_of_a_constructor_that_draws_from_random_start_alike(tmp_path: Path) -> None:
    import random

    import numpy as np

    model = classifier("seedlike.RandomInit")
    first = fit(tmp_path, model, name="a", max_steps=1)
    random.random(), np.random.random()  # whatever ran before, the second run starts from the same weights
    second = fit(tmp_path, model, name="b", max_steps=1)
    a, b = load_file(first / "final" / "model.safetensors"), load_file(second / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_and_aux_combined_by_weights(tmp_path: Path) -> None:
    """tf-bind's ``model.combine_losses(loss, aux_loss)``: "loss" in loss_weights names the tuple's first entry."""
    plain = fit(tmp_path, classifier("seedlike.WithAux"), name="plain", part_names=["aux"])
    run = fit(tmp_path, classifier("seedlike.WithAux"), part_names=["aux"], loss_weights={"loss": 1.0, "aux": 2.0})
    first, weighted = records(plain)[0], records(run)[0]
    assert weighted["parts"]["aux"] == pytest.approx(first["parts"]["aux"])
    assert weighted["loss"] == pytest.approx(first["loss"] + 2.0 * first["parts"]["aux"], rel=1e-5)
    assert set(weighted["parts"]) == {"aux"}


def test_a_loss_method_of_the_model_class_as_forward(tmp_path: Path) -> None:
    model = {"class_path": "seedlike.LossMethod", "init_args": {"dim": 4, "classes": 3}}
    by_method = fit(tmp_path, model, name="method", forward="seedlike.LossMethod.loss")
    by_function = fit(tmp_path, model, name="function", forward="seedlike.single_batch_loss")
    assert [r["loss"] for r in records(by_method)] == [r["loss"] for r in records(by_function)]


def test_several_sources_each_by_its_class_path(tmp_path: Path) -> None:
    """tf-bind's positives, negatives and scoped negatives: ``data: {name: {class_path: ...}, ...}``."""
    sources = {"pos": DATA, "neg": {"class_path": "seedlike.Points", "init_args": {"n": 32, "seed": 1}}}
    run = fit(tmp_path, classifier(), sources, mix="concat", max_steps=2)
    assert len(records(run)) == 2
    val = {"a": {"class_path": "seedlike.Points", "init_args": {"n": 16, "seed": 2}}, "b": DATA}
    path = config(tmp_path, classifier(), sources, mix="each", val_every=2, max_steps=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["val_data"] = val
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--run-dir", str(tmp_path / "two")]) == 0
    for name in ("a", "b"):  # each validation set logged on its own (no mean of the two unless val_mean)
        assert records(tmp_path / "two", f"val/{name}")[-1]["step"] == 2


# ------------------------------------------------------------------------------------ examples/seeds
SEEDS = sorted((Path(__file__).resolve().parents[1] / "examples" / "seeds").glob("*.yaml"))


def _ours(value: object) -> bool:
    """Whether a trainer value names nothing of the seed packages or of the user's project (importable here)."""
    text = json.dumps(value)
    return not any(name in text for name in ("my_project", "soundstorm_pytorch", "musiclm_pytorch", "meshgpt_pytorch",
                                             "tf_bind_transformer", "enformer_pytorch", "step."))


@pytest.mark.parametrize("path", SEEDS, ids=[p.stem for p in SEEDS])
def test_a_seed_recipes_trainer_section_parses(path: Path, tmp_path: Path) -> None:
    """The seed packages are not installed here: the trainer section is parsed with a stand-in model and data,
    leaving out only the values that name the seed's (or the user's) own functions."""
    from cadence.cli.main import root_parser

    recipe = yaml.safe_load(path.read_text())
    assert set(recipe) <= {"model", "data", "val_data", "trainer"} and "." in recipe["model"]["class_path"]
    trainer = {k: v for k, v in recipe["trainer"].items() if _ours(v)}
    assert len(trainer) >= len(recipe["trainer"]) - 2
    stand_in = config(tmp_path, classifier(), **trainer)
    cfg = root_parser().parse_args(["fit", "--config", str(stand_in)]).fit
    for key, value in trainer.items():
        if not isinstance(value, (dict, list)) and not callable(cfg.trainer[key]):
            assert cfg.trainer[key] == value
