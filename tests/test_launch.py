"""``cadence fit --nproc N``: the launcher keeps the signal contract of one process (every worker stops at the
same step and saves, the launcher exits 128 + signal, no worker outlives it), reports a config error once,
and a launcher of several nodes says whom it waits for and stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not hasattr(signal, "SIGUSR1"),
                                reason="needs torch.distributed and POSIX signals")

SLOW_MODEL = '''
import os, time
from pathlib import Path
import torch

class Slow(torch.nn.Module):
    """Writes started-RANK (its pid) at its first training step, then takes `delay` seconds per step; in
    validation, appends a line to validating-RANK per batch and takes `val_delay` seconds."""
    def __init__(self, delay: float = 3.0, val_delay: float = 0.0):
        super().__init__()
        self.net = torch.nn.Linear(64, 10)
        self.delay, self.val_delay = delay, val_delay
    def forward(self, pixels, labels):
        rank = os.environ.get('RANK', '0')
        if self.training:
            Path(f"started-{rank}").write_text(str(os.getpid()))
            time.sleep(self.delay)
        else:
            with open(f"validating-{rank}", "a") as f:
                print("batch", file=f)
            time.sleep(self.val_delay)
        return torch.nn.functional.cross_entropy(self.net(pixels), labels)
'''
CONFIG = """
model:
  class_path: slow_model.Slow
data:
  class_path: cadence.demo.Digits
  init_args:
    n: 128
trainer:
  batch_size: 16
  max_steps: 2
  device: cpu
  progress: false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    (tmp_path / "slow.yaml").write_text(CONFIG)
    return subprocess.Popen([sys.executable, "-m", "cadence", "fit", "--nproc", "2", "--master-port",
                             str(free_port()), "--config", "slow.yaml", "--run-dir", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path,
                            start_new_session=True)


def wait_for(paths: list[Path], proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(p.exists() and p.read_text() for p in paths):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the workers never started training"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig,to_group,code", [
    (signal.SIGUSR1, False, 138),
    pytest.param(signal.SIGTERM, True, 143, marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, False, 130, marks=pytest.mark.slow),
])
def test_a_signal_to_the_launcher_stops_every_worker_at_one_step(tmp_path: Path, sig, to_group, code) -> None:
    proc = start(tmp_path)
    markers = [tmp_path / "started-0", tmp_path / "started-1"]
    wait_for(markers, proc)
    if to_group:
        os.killpg(proc.pid, sig)  # as a scheduler or a terminal does
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code, err[-3000:]
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000000001"]  # every rank stopped and saved at step 1
    files = {p.name for p in checkpoints[0].iterdir()}
    assert {"rng-rank00000.safetensors", "rng-rank00001.safetensors", "manifest.json"} <= files
    pids = [int(p.read_text()) for p in markers]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # reparented workers are reaped by init
    assert not any(alive(pid) for pid in pids)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # FSDP: every forward is collective; the ranks agree per batch
def test_a_signal_during_validation_stops_every_rank_within_one_batch(tmp_path: Path, strategy: str) -> None:
    proc = start(tmp_path, "--model.delay", "0", "--model.val_delay", "2", "--val_data.class_path",
                 "cadence.demo.Digits", "--val_data.n", "256", "--trainer.val_every", "1",
                 "--trainer.strategy", strategy)
    markers = [tmp_path / "validating-0", tmp_path / "validating-1"]
    wait_for(markers, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 138, err[-3000:]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000000001"]
    for marker in markers:  # 8 batches per rank; each stopped within one batch of the signal
        assert len(marker.read_text().splitlines()) <= 2
    splits = {json.loads(line)["split"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()}
    assert "val" not in splits


def test_sigkill_of_the_launcher_leaves_no_worker(tmp_path: Path) -> None:
    proc = start(tmp_path, "--model.delay", "30")
    markers = [tmp_path / "started-0", tmp_path / "started-1"]
    wait_for(markers, proc)
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    pids = [int(p.read_text()) for p in markers]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("args,fragment", [
    (["--trainer.lrr", "3"], "trainer.lrr: unknown option; did you mean --trainer.lr?"),
    (["--trainer.max_steps", "-1"], "max_steps=-1"),
    (["--model.init_args.dely", "1"], "unknown argument 'dely'"),
])
def test_a_config_error_under_nproc_is_reported_once(tmp_path: Path, args: list[str], fragment: str) -> None:
    proc = start(tmp_path, *args)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2
    assert err.count("cadence: error:") == 1 and fragment in err and "Traceback" not in err
    assert "error" not in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "started-0").exists()


def test_a_node_waiting_for_the_others_says_so_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    (tmp_path / "slow.yaml").write_text(CONFIG)
    proc = subprocess.Popen([sys.executable, "-m", "cadence", "fit", "--nproc", "1", "--nnodes", "2", "--master-port",
                             str(free_port()), "--config", "slow.yaml", "--run-dir", "run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    line = ""
    while "waiting for" not in line and proc.poll() is None:
        line = proc.stderr.readline()
    assert "waiting for" in line and "node 0 of 2" in line and "Ctrl-C" in line
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)  # no hang in the rendezvous
    assert proc.returncode in (130, -signal.SIGINT)
