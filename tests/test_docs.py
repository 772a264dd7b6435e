"""Every Python example in the README and docs/ runs, and every YAML example is a valid config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the examples' models are tiny: one thread each
pytestmark = pytest.mark.usefixtures("one_thread")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Blocks that show a signature with placeholder names rather than a runnable program.
SIGNATURE_ONLY = re.compile(r"Trainer\(model, train_data")


def blocks(language: str) -> list[tuple[str, int, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
            line = text[: match.start()].count("\n") + 1
            found.append((path.name, line, match.group(1)))
    return found


OPTIONAL = ("transformers", "datasets", "torchdata")
PYTHON = [b for b in blocks("python") if not SIGNATURE_ONLY.search(b[2])]


@pytest.mark.parametrize("name,line,code", PYTHON, ids=[f"{n}:{ln}" for n, ln, _ in PYTHON])
def test_python_example_runs(name: str, line: int, code: str, tmp_path: Path, monkeypatch) -> None:
    for package in OPTIONAL:  # an example of an optional integration runs where its package is installed
        if re.search(rf"^(from|import) {package}\b", code, re.M):
            pytest.importorskip(package)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # examples never download
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__docs__"})


def test_there_are_examples() -> None:
    assert len(PYTHON) >= 4


@pytest.mark.parametrize("name,line,code", blocks("yaml"), ids=[f"{n}:{ln}" for n, ln, _ in blocks("yaml")])
def test_yaml_example_is_a_config(name: str, line: int, code: str, tmp_path: Path) -> None:
    from cadence.cli.main import root_parser

    config = yaml.safe_load(code)
    assert set(config) <= {"model", "data", "val_data", "test_data", "trainer"}
    path = tmp_path / "config.yaml"
    path.write_text(code)
    cfg = root_parser().parse_args(["fit", "--config", str(path)])
    assert cfg.fit.model.class_path == config["model"]["class_path"]
    for key, value in config.get("trainer", {}).items():
        assert cfg.fit.trainer[key] == value
