"""The six recipes in ``examples/`` (one per seed trainer) run through ``cadence fit --config examples/<name>.yaml``
with fewer steps: each one's loss falls and its key behaviour shows in the run folder."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cadence import Trainer, load_weights
from cadence.cli.main import main as cadence
from cadence.runs import read_records

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["tf_bind", "mulan", "soundstorm", "meshgpt_autoencoder", "meshgpt_transformer", "step"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def at_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Recipes run from the repository root, where ``examples.<module>.<Class>`` class paths resolve."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    yield


def recipe(name: str) -> ModuleType:
    return importlib.import_module(f"examples.{name}")


def run(name: str, run_dir: Path, *overrides: str) -> list[dict[str, Any]]:
    """The recipe's ``main`` (``cadence fit`` on its YAML, then the first and last loss); its records."""
    assert recipe(name).main(["--run-dir", str(run_dir), "--trainer.progress", "false", *overrides]) == 0
    return read_records(run_dir)


def train(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["split"] == "train" and "loss" in r]


def val(records: list[dict[str, Any]], split: str = "val") -> list[dict[str, Any]]:
    return [r for r in records if r["split"] == split]


def assert_loss_fell(records: list[dict[str, Any]], capsys: pytest.CaptureFixture, name: str) -> None:
    losses = [r["loss"] for r in train(records)]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"{name}: first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}"


def config_of(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_is_a_config_the_cli_reads(name: str) -> None:
    from cadence.cli.main import root_parser

    cfg = root_parser().parse_args(["fit", "--config", f"examples/{name}.yaml"]).fit
    assert cfg.model.class_path.startswith(f"examples.{name}.")
    assert cfg.data["class_path"].startswith(f"examples.{name}.")
    assert set(config_of(name)) <= {"model", "data", "val_data", "trainer"}
    assert callable(recipe(name).main)


def test_tf_bind_draws_every_source_with_an_aux_loss_and_accuracy(tmp_path: Path, capsys) -> None:
    records = run("tf_bind", tmp_path / "run", "--trainer.max_steps", "80", "--trainer.val_every", "40")
    assert_loss_fell(records, capsys, "tf_bind")
    parts = train(records)[-1]["parts"]
    for source in ("pos", "neg", "scoped_neg"):  # one batch of each source in every step
        assert {f"{source}/bce", f"{source}/aux", f"{source}/acc", f"{source}/loss"} <= set(parts)
    checks = val(records)
    assert [r["step"] for r in checks] == [0, 40, 80]  # val_at_start: the seed validated at step 0 too
    assert {"bce", "aux", "acc"} <= set(checks[-1]["parts"]) and checks[-1]["parts"]["acc"] > 0.5
    assert checks[-1]["loss"] < checks[0]["loss"]

    tf_bind = recipe("tf_bind")
    train_set, val_set = tf_bind.peak_sources()["pos"], tf_bind.Peaks("mixed", [9, 10])
    counts = torch.bincount(train_set.tf)
    assert counts.max() > 3 * counts.min()  # imbalanced factors ...
    drawn = []

    def forward(model: torch.nn.Module, batch: Any) -> Any:
        drawn.append(batch[1])
        return model(*batch)

    Trainer(tf_bind.TfBind(), train_set, sampler="balanced", balance_by=tf_bind.target_of, forward=forward,
            loss_weights={"bce": 1.0, "aux": 0.05}, batch_size=32, max_steps=20, progress=False).fit()
    counts = torch.bincount(torch.cat(drawn))
    assert counts.max() < 1.6 * counts.min()  # ... which the YAML's balanced sampling draws equally often
    seen = {tuple(s.tolist()) for s in train_set.seq}
    assert not any(tuple(s.tolist()) in seen for s in val_set.seq)  # held-out chromosomes share no window


def test_mulan_trains_with_lion_on_a_seeded_split_and_refuses_a_batch_of_one(tmp_path: Path, capsys) -> None:
    records = run("mulan", tmp_path / "run", "--trainer.max_steps", "60", "--trainer.val_every", "30")
    assert_loss_fell(records, capsys, "mulan")
    assert [r["step"] for r in val(records)] == [30, 60]
    optimizer = json.loads((tmp_path / "run" / "checkpoints" / "step-000000060" / "optimizer.json").read_text())
    assert optimizer["param_groups"][0]["betas"] == [0.9, 0.99]  # Lion, as use_lion=True
    mulan = recipe("mulan")
    wav, text = mulan.TextAudioPairs(size=2)[0]
    with pytest.raises(ValueError, match="greater than 1"):
        mulan.MuLaN()(wav[None], text[None])


def test_mulan_pads_to_the_longest_with_adam(tmp_path: Path, capsys) -> None:
    records = run("mulan", tmp_path / "run", "--trainer.max_steps", "40", "--trainer.val_every", "40",
                  "--trainer.lr", "0.003", "--trainer.optimizer", "adam", "--trainer.collate_fn",
                  "cadence.data.pad_collate", "--trainer.inputs", "[wavs, texts, wav_mask]")
    assert_loss_fell(records, capsys, "mulan")
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["trainer"]
    assert resolved["collate_fn"] == "cadence.data.pad_collate"
    assert resolved["optimizer"] == "adam" and resolved["optimizer_options"] == {"betas": [0.9, 0.99]}
    optimizer = json.loads((tmp_path / "run" / "checkpoints" / "step-000000040" / "optimizer.json").read_text())
    assert optimizer["param_groups"][0]["betas"] == [0.9, 0.99] and "amsgrad" in optimizer["param_groups"][0]


def test_soundstorm_warms_up_then_anneals_and_logs_generator_and_critic(tmp_path: Path, capsys) -> None:
    records = run("soundstorm", tmp_path / "run", "--trainer.max_steps", "60", "--trainer.val_every", "20")
    assert_loss_fell(records, capsys, "soundstorm")
    steps = train(records)
    assert {"generator_loss", "critic_loss"} <= set(steps[-1]["parts"])
    assert {"generator_loss", "critic_loss"} <= set(val(records)[-1]["parts"])
    assert [r["step"] for r in val(records)] == [0, 20, 40, 60]  # val_at_start, as the seed
    lr = {r["step"]: r["lr"] for r in steps}
    warming, annealing, end = lr[20], lr[40], lr[60]  # warm-up is 30 steps
    assert 1e-5 < warming < 3e-3 and annealing < 3e-3 and end < annealing and warming < annealing
    soundstorm = recipe("soundstorm")
    semantic, acoustic = soundstorm.SemanticAcousticPairs(size=4)[:4]
    loss, parts = soundstorm.SoundStorm()(semantic, acoustic, only_train_critic=True)  # flags per call, as the seed
    assert isinstance(parts, soundstorm.LossBreakdown) and torch.equal(loss, parts.critic_loss)
    loss, parts = soundstorm.SoundStorm()(semantic, acoustic, only_train_generator=True)
    assert parts.critic_loss is None and torch.equal(loss, parts.generator_loss)
    only_generator = run("soundstorm", tmp_path / "gen", "--trainer.max_steps", "4", "--trainer.val_every", "4",
                         "--trainer.log_every", "2", "--trainer.warmup_steps", "2",
                         "--trainer.forward_kwargs", "{only_train_generator: true}")
    assert all(set(r["parts"]) == {"generator_loss"} for r in train(only_generator))  # None parts left out
    assert {"generator_loss", "critic_loss"} <= set(val(only_generator)[-1]["parts"])  # validation: no flags


def test_meshgpt_autoencoder_validates_on_the_ema(tmp_path: Path, capsys) -> None:
    records = run("meshgpt_autoencoder", tmp_path / "run", "--trainer.max_steps", "60", "--trainer.val_every", "30")
    assert_loss_fell(records, capsys, "meshgpt_autoencoder")
    assert {"recon", "commit"} <= set(train(records)[-1]["parts"])
    checks = val(records)
    assert [r["step"] for r in checks] == [30, 60] and {"recon", "commit"} <= set(checks[-1]["parts"])
    assert "inputs" not in config_of("meshgpt_autoencoder")["trainer"]  # the dataset declares its fields

    mae = recipe("meshgpt_autoencoder")
    init_args = config_of("meshgpt_autoencoder")["model"]["init_args"]
    val_set = mae.Meshes(**config_of("meshgpt_autoencoder")["val_data"]["init_args"])

    def val_loss(weights: Path) -> float:
        model = load_weights(mae.MeshAutoencoder(**init_args), weights).eval()
        with torch.no_grad():
            losses = [model(*mae.mesh_collate([val_set[i] for i in range(s, s + 16)])[:3])
                      for s in range(0, len(val_set), 16)]  # the loss alone: no return_loss_breakdown
        return float(torch.stack(losses).mean())

    final = tmp_path / "run" / "final"
    assert val_loss(final / "ema.safetensors") == pytest.approx(checks[-1]["loss"], rel=1e-5)
    assert val_loss(final / "model.safetensors") != pytest.approx(checks[-1]["loss"], rel=1e-5)


def test_meshgpt_transformer_leaves_the_frozen_autoencoder_out_and_resumes_from_its_config(tmp_path: Path,
                                                                                        capsys) -> None:
    run_dir = tmp_path / "run"
    records = run("meshgpt_transformer", run_dir, "--trainer.max_steps", "40", "--trainer.val_every", "20",
                  "--trainer.checkpoint_every", "20", "--trainer.log_every", "10")
    assert_loss_fell(records, capsys, "meshgpt_transformer")

    mt = recipe("meshgpt_transformer")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # the checkpoint's config: rebuild the model
    assert config["model"]["class_path"] == "examples.meshgpt_transformer.MeshTransformer"
    torch.manual_seed(config["trainer"]["seed"])
    initial = mt.MeshTransformer(**config["model"]["init_args"])
    final = load_file(run_dir / "final" / "model.safetensors")
    for name, p in initial.named_parameters():
        assert torch.equal(final[name], p) == name.startswith("autoencoder."), name  # frozen ones, and only they

    newest = run_dir / "checkpoints" / "step-000000040"
    state = json.loads((newest / "trainer.json").read_text())
    assert state["step"] == 40 and state["cadence_version"] and state["torch_version"]
    optimizer = load_file(newest / "optimizer.safetensors")
    trained = {int(key.split(".")[1]) for key in optimizer}
    assert len(trained) == sum(p.requires_grad for p in initial.parameters()) < len(list(initial.parameters()))
    rebuilt = load_weights(mt.MeshTransformer(**config["model"]["init_args"]), newest / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in rebuilt.state_dict().items())

    assert cadence(["fit", "--resume", str(run_dir), "--trainer.max_steps", "50", "--trainer.progress", "false"]) == 0
    assert (run_dir / "checkpoints" / "step-000000050").is_dir()


def test_step_stages_multistep_and_early_stopping_per_loss(tmp_path: Path, capsys) -> None:
    records = run("step", tmp_path / "run")
    assert_loss_fell(records, capsys, "step")
    stop = [r for r in records if r.get("event") == "stop"]
    assert len(stop) == 1 and "val/recon" in stop[0]["reason"] and "val/cls" in stop[0]["reason"]
    steps = train(records)
    per_epoch = next(r["step"] for r in records if r["split"] == "train_epoch" and r["epoch"] == 0)
    assert stop[0]["step"] < 40 * per_epoch  # before max_epochs
    assert len(val(records)) == stop[0]["step"] // per_epoch  # one validation per epoch
    lr = {r["step"]: r["lr"] for r in steps}
    assert lr[10] == pytest.approx(1e-3)  # stage 1
    assert lr[200] == pytest.approx(3e-4)  # stage 2: tune_lr (the batch embedding's group is at 3e-3)
    assert lr[400] == pytest.approx(3e-4 * 0.3) and lr[550] == pytest.approx(3e-4 * 0.09)  # milestones 300, 500
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert final["batch_embedding.weight"].abs().sum() > 0  # tuned in stage 2

    step = recipe("step")
    data = step.CellExpression(**config_of("step")["data"]["init_args"])
    from cadence.data.split import split

    train_part, val_part = split(data, 0.2, 0, step.sample_of, "stratified")  # category_random_split
    per_sample = torch.bincount(data.sample)
    held_out = torch.bincount(torch.stack([val_part[i][3] for i in range(len(val_part))]), minlength=len(per_sample))
    assert held_out.tolist() == [m - int((1 - 0.2) * m) for m in per_sample.tolist()]  # the rest of each sample
    assert len(train_part) + len(val_part) == len(data)


def test_step_first_stage_leaves_the_batch_embedding_frozen(tmp_path: Path, capsys) -> None:
    records = run("step", tmp_path / "run", "--trainer.max_epochs", "5")
    assert_loss_fell(records, capsys, "step")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert final["batch_embedding.weight"].abs().sum() == 0 and final["encoder.0.weight"].abs().sum() > 0
