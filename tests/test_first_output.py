"""First output at once: ``cadence fit`` on a pipe prints its run folder before the first step, then a line and a
``metrics.jsonl`` record at step 1 (not only at the first ``log_every`` point); a resumed run says its step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cadence import Trainer
from helpers import MLP, make_data

ROOT = Path(__file__).resolve().parents[1]
SLOW = '''
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Data(TensorDataset):
    def __init__(self, n: int = 64) -> None:
        x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
        super().__init__(x, x.sum(1, keepdim=True))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(self, x, y):
        time.sleep(0.02)  # a slow step: the run lasts seconds after its first lines
        return nn.functional.mse_loss(self.net(x), y)
'''
CONFIG = """model:
  class_path: slow.Net
data:
  class_path: slow.Data
trainer:
  batch_size: 8
  max_steps: 100000
  log_every: 100000
  checkpoint_every: 5
  device: cpu
"""


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "cadence", "fit", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cadence_fit_on_a_pipe_shows_its_folder_and_step_one_at_once(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    (tmp_path / "slow.yaml").write_text(CONFIG)
    proc = start(tmp_path, "--config", "slow.yaml", "--run-dir", "run")
    guard = threading.Timer(120, proc.kill)  # were the lines held back, readline() would wait for the end
    guard.start()
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        alive = proc.poll() is None  # the run (100000 slow steps) is still going: these lines came at once
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        guard.cancel()
        proc.kill()
    assert first == "run folder: run\n", (first, err)
    assert second.startswith("step 1/100000 loss="), (second, err)
    assert alive, err
    assert records[0]["step"] == 1 and records[0]["split"] == "train" and "loss" in records[0]
    assert proc.returncode == 143, err

    step = int(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    resumed = start(tmp_path, "--resume", "run", "--trainer.max_steps", str(step + 1))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert out.splitlines()[0] == "run folder: run"
    assert f"resumed at step {step} from " in err


@pytest.mark.usefixtures("one_thread")
def test_the_first_log_point_is_step_one_then_every_log_every():
    t = Trainer(MLP(), make_data(64), batch_size=8, max_steps=12, log_every=5, progress=False)
    t.fit()
    assert [r["step"] for r in t.history if r["split"] == "train"] == [1, 5, 10, 12]
