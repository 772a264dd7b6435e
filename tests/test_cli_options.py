"""Every option on the command line means what it says: data and model init args (long and short forms, on
the command line and in YAML), merged configs, an optimizer's own lr, class path errors, a readable --help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cadence.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TWO = ["--trainer.max_steps", "2", "--trainer.warmup_steps", "0", "--trainer.progress", "false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(*args: str) -> int:
    return main(["fit", *args])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("cadence: error:") and "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("option", ["--data.init_args.n", "--data.n"])
def test_data_init_args_change_the_dataset(tmp_path: Path, option: str) -> None:
    run = tmp_path / "run"
    assert fit("--run-dir", str(run), *TWO, option, "3", "--trainer.valid_frac", "null",
               "--trainer.val_every", "null") == 0
    assert config(run)["data"] == {"class_path": "cadence.demo.Digits", "init_args": {"n": 3}}
    # 3 digits make one (partial) batch of 64: every step ends an epoch
    assert [r["step"] for r in records(run) if r["split"] == "train_epoch"] == [1, 2]


def test_val_data_and_model_init_args_are_applied(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit("--run-dir", str(run), *TWO, "--trainer.valid_frac", "null", "--val_data.class_path",
               "cadence.demo.Digits", "--val_data.init_args.n", "5", "--model.hidden", "16",
               "--model.init_args.dropout", "0.0") == 0
    saved = config(run)
    assert saved["val_data"] == {"class_path": "cadence.demo.Digits", "init_args": {"n": 5}}
    assert saved["model"]["init_args"]["hidden"] == 16 and saved["model"]["init_args"]["dropout"] == 0.0
    from safetensors.torch import load_file

    assert load_file(run / "final" / "model.safetensors")["net.0.weight"].shape == (16, 64)


def test_a_second_config_merges_section_by_section(tmp_path: Path, capsys) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("data:\n  class_path: cadence.demo.Digits\n  init_args:\n    n: 50\n"
                     "model:\n  init_args:\n    hidden: 16\n")
    second.write_text("data:\n  init_args:\n    n: 30\nmodel:\n  init_args:\n    dropout: 0.2\n")
    demo = str(ROOT / "examples" / "digits.yaml")
    with pytest.raises(SystemExit):
        fit("--config", demo, "--config", str(first), "--config", str(second), "--print_config")
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"] == {"class_path": "cadence.demo.Digits", "init_args": {"n": 30}}
    assert printed["model"]["init_args"]["hidden"] == 16 and printed["model"]["init_args"]["dropout"] == 0.2
    assert printed["trainer"]["batch_size"] == 64  # the first file's other sections stay


@pytest.mark.parametrize("args,expected", [
    (["--data.init_args.nn", "3"], ["data.init_args.nn", "unknown argument 'nn'", "the class takes: n"]),
    (["--data.m", "3"], ["unknown argument 'm'", "the class takes: n"]),
    (["--model.init_args.hiddn", "3"], ["model.init_args.hiddn", "hidden, dropout, inputs, classes"]),
    (["--model.hiddn", "3"], ["unknown argument 'hiddn'", "hidden, dropout, inputs, classes"]),
    (["--val_data.class_path", "cadence.demo.Digits", "--val_data.x", "1"], ["val_data.init_args.x", "takes: n"]),
    (["--trainer.lr", "abc"], ["trainer.lr='abc'", "float"]),
    (["--trainer.optimizer.lr", "0.1"], ["trainer.optimizer", "class_path"]),
])
def test_unknown_init_args_name_the_real_parameters(tmp_path: Path, capsys, args, expected) -> None:
    assert fit("--run-dir", str(tmp_path / "run"), *TWO, *args) == 2
    err = error(capsys)
    for fragment in expected:
        assert fragment in err
    assert "init_args.trainer" not in err and "NestedArg" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section,text", [
    ("data", "data:\n  class_path: cadence.demo.Digits\n  init_args:\n    size: 3\n"),
    ("model", "model:\n  init_args:\n    hiddn: 3\n"),
])
def test_unknown_init_args_in_yaml(tmp_path: Path, capsys, section: str, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert fit("--config", str(ROOT / "examples" / "digits.yaml"), "--config", str(path), *TWO) == 2
    err = error(capsys)
    assert f"{section}.init_args." in err and "unknown argument" in err and "takes:" in err


MODULES = {
    "syntax_broken": "import torch\nclass M(torch.nn.Module)\n    pass\n",
    "needs_missing": "import torch\nimport not_an_installed_package_xyz\nclass M(torch.nn.Module):\n    pass\n",
    "plain_classes": ("import torch\nclass NotModule:\n    def __init__(self, a: int = 1):\n        pass\n"
                      "class Boom(torch.nn.Module):\n    def __init__(self):\n"
                      "        raise ValueError('width must be even')\n"
                      "class BadData:\n    def __init__(self, n: int = 3):\n"
                      "        raise RuntimeError('cannot open the shards')\n"),
}


@pytest.mark.parametrize("args,expected", [
    (["--model", "syntax_broken.M"], ["syntax_broken.py", "line 2", "SyntaxError"]),
    (["--model", "needs_missing.M"], ["needs_missing.py:2", "not_an_installed_package_xyz"]),
    (["--model", "plain_classes.NotModule"], ["not an nn.Module"]),
    (["--model.class_path", "torch.optim.SGD"], ["torch.optim.SGD", "not an nn.Module"]),
    (["--model", "plain_classes.Missing"], ["has no 'Missing'", "NotModule"]),
    (["--model", "nowhere_at_all.M"], ["no module 'nowhere_at_all'", "working directory", "installed packages"]),
    (["--model", "plain_classes.Boom"], ["plain_classes.py:7", "ValueError: width must be even"]),
    (["--data", "plain_classes.BadData"], ["data:", "plain_classes.py:10", "cannot open the shards"]),
    (["--data.class_path", "syntax_broken.M"], ["data.class_path", "syntax_broken.py", "SyntaxError"]),
    (["--config", "broken.yaml"], ["model.class_path='syntax_broken.M'", "syntax_broken.py, line 2"]),
])
def test_class_path_errors_say_what_is_wrong(tmp_path: Path, capsys, monkeypatch, args, expected) -> None:
    for name, text in MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    (tmp_path / "broken.yaml").write_text("model:\n  class_path: syntax_broken.M\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert fit("--config", str(ROOT / "examples" / "digits.yaml"), "--run-dir", "run", *TWO, *args) == 2
    err = error(capsys)
    for fragment in expected:
        assert fragment in err
    assert "does not import" not in err or "nowhere" in err
    assert not (tmp_path / "run").exists()


def test_an_optimizer_by_class_path_keeps_its_lr(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit("--run-dir", str(run), *TWO, "--trainer.optimizer", "torch.optim.SGD", "--trainer.optimizer.lr",
               "0.5", "--trainer.optimizer.momentum", "0.9") == 0
    assert [r["lr"] for r in records(run) if r["split"] == "train"][0] == pytest.approx(0.5)
    saved = config(run)["trainer"]
    assert saved["lr"] == 0.5 and saved["optimizer"]["init_args"]["lr"] == 0.5
    assert saved["optimizer"]["init_args"]["momentum"] == 0.9


def test_an_optimizer_without_lr_records_the_trainers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit("--run-dir", str(run), *TWO, "--trainer.optimizer.class_path", "torch.optim.SGD",
               "--trainer.lr", "0.2") == 0
    saved = config(run)["trainer"]
    assert saved["lr"] == 0.2 and saved["optimizer"]["init_args"]["lr"] == 0.2  # what ran


def test_two_different_lrs_are_an_error(tmp_path: Path, capsys) -> None:
    assert fit("--run-dir", str(tmp_path / "run"), *TWO, "--trainer.optimizer", "torch.optim.SGD",
               "--trainer.optimizer.lr", "0.5", "--trainer.lr", "0.2") == 2
    err = error(capsys)
    assert "trainer.optimizer.init_args.lr=0.5" in err and "trainer.lr=0.2" in err


def test_fit_help_is_short_and_lists_the_launcher(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 150
    for flag in ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-endpoint",
                 "--rdzv-id"):
        assert flag in text
    assert "torch.nn.Linear" not in text and "known subclasses" not in text
    assert "--model.NAME" in text and "--data.NAME" in text and "working directory" in text


def test_a_class_help_lists_its_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.help", "cadence.demo.DigitsMLP"])
    assert stop.value.code in (0, None)
    text = capsys.readouterr().out
    assert "--model.hidden" in text and "--model.dropout" in text and "--trainer." not in text
