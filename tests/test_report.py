"""``cadence report``: one self-contained HTML page; and, where Chromium is installed, the page as drawn."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cadence import ConfigError
from cadence.cli.main import main
from cadence.report import write_report
from helpers import MLP, make_data, trainer
from test_runs import fake_run

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # the first two runs' colours


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [fake_run(tmp_path / "slow", lr=0.01), fake_run(tmp_path / "fast", lr=0.03, steps=150)]


def test_report_of_several_runs(two_runs: list[Path], tmp_path: Path) -> None:
    out = write_report(two_runs, tmp_path / "compare.html")
    page = out.read_text()
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    titles = ["loss", "acc", "learning rate", "throughput", "gradient norm"]
    assert len(svgs) == len(titles)
    for svg, title in zip(svgs, titles):
        assert f">{title}<" in svg  # the plot's title, as SVG text
    for label in ("slow train", "slow val", "fast train", "fast val"):  # both runs overlaid, in the legends
        assert page.count(f">{label}<") == 2  # in the loss plot and the acc plot
    differ = page[page.index("Keys that differ"):page.index('<div class="configs">')]
    keys = re.findall(r"<tr><td><code>([\w.]+)</code></td>", differ)
    assert keys == ["run_dir", "trainer.lr", "trainer.max_steps"]  # trainer.batch_size is the same: not listed
    assert page.count("<pre>") == 2 and "class_path: cadence.demo.DigitsMLP" in page  # each full config


def test_report_is_self_contained(two_runs: list[Path], tmp_path: Path) -> None:
    page = write_report(two_runs, tmp_path / "compare.html").read_text()
    for needle in ("<script", "<link", "<img", "<iframe", "@import", "src="):
        assert needle not in page
    assert not re.search(r"url\((?!#)", page)  # only clip paths inside the page
    # the only addresses are the SVG namespace names, which are never fetched
    assert set(re.findall(r'"(https?://[^"]*)"', page)) <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert not re.search(r'href="(?!#)', page)  # links only to ids inside the page


def test_report_of_a_real_run_goes_into_its_folder(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    trainer(MLP(), make_data(60), valid_frac=0.25, batch_size=8, max_steps=12, log_every=3, val_every=6,
            run_dir=run).fit()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.html'}"
    page = (run / "report.html").read_text()
    assert "<td>finished</td>" in page and len(re.findall("<svg", page)) >= 3
    assert main(["report", str(run)]) == 2  # the file exists now
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["report", str(run), "--overwrite"]) == 0


def test_errors(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("trainer: {}\n")
    cases = [
        ([*map(str, two_runs)], "--output=None: a report of several runs needs a file to go to; pass -o"),
        ([str(empty)], f"run='{empty}': no metrics.jsonl there; give the folder of a run"),
        ([str(tmp_path / "missing")], "no such folder"),
        ([str(two_runs[0]), "-o", str(tmp_path)], "it is a folder; give a file path"),
    ]
    for args, message in cases:
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cadence: error: ") and message in err and err.count("\n") == 1
    assert not (two_runs[0] / "report.html").exists()


def test_missing_matplotlib_names_the_extra(two_runs: list[Path], monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    with pytest.raises(ConfigError, match=r'pip install "cadence\[report\]"'):
        write_report(two_runs[:1])


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CADENCE_REQUIRE_CHROMIUM"),
                    reason="chromium is not installed (make report-test installs it)")
def test_chromium_draws_the_plots(two_runs: list[Path], tmp_path: Path) -> None:
    """Headless Chromium opens the page from disk; the plot area of the screenshot holds both runs' curves."""
    Image = pytest.importorskip("PIL.Image")
    assert CHROMIUM is not None, "CADENCE_REQUIRE_CHROMIUM is set but chromium is not installed"
    page = write_report(two_runs, tmp_path / "compare.html")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape == (2000, 1200, 3)
    plots = image[250:1250]  # below the title and the summary table: the first rows of plots
    white = (plots == 255).all(axis=2).mean()
    assert white < 0.97, "the plot area is blank"
    for colour in (BLUE, ORANGE):
        near = (np.abs(plots - colour).max(axis=2) < 40).sum()
        assert near > 500, f"only {near} pixels of the run colour {colour}: the curves were not drawn"
