"""The run lock belongs to the training process alone: children it forks (DataLoader workers, compile workers,
a user's ``multiprocessing`` or ``subprocess``) do not keep the folder locked after a SIGKILL of the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from cadence.rundir import RunLock, lock_holder

ROOT = Path(__file__).resolve().parents[1]

# A run that says "training" (and its children's PIDs) once step 1 is done, then trains slowly until killed.
SCRIPT = r"""
import multiprocessing, os, subprocess, sys, time
import torch
from torch import nn
from torch.utils.data import Dataset
from cadence import Trainer

CASE = sys.argv[2]

class Items(Dataset):
    def __len__(self):
        return 256
    def __getitem__(self, i):
        return torch.full((4,), float(i)), torch.tensor(i % 2)

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)
    def forward(self, x, y):
        if CASE != "compile":
            time.sleep(0.05)  # slower than the data: the workers sit idle with their batches ready
        return nn.functional.cross_entropy(self.net(x), y)

def nap():
    time.sleep(600)

def children():
    found = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            found += f.read().split()
    return found

class Report:
    def on_fit_start(self, t):
        if CASE == "user":
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            multiprocessing.get_context("fork").Process(target=nap, daemon=False).start()
    def on_step_end(self, t):
        if t.step == 1:
            print("training", *children(), flush=True)

Trainer(Slow(), Items(), batch_size=8, max_steps=100000, device="cpu", progress=False, run_dir=sys.argv[1],
        num_workers=2 if CASE == "workers" else 0, compile=CASE == "compile", callbacks=[Report()]).fit()
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("case", ["workers", "user", pytest.param("compile", marks=pytest.mark.slow)])
def test_a_killed_run_leaves_no_lock_behind_its_children(tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TORCHINDUCTOR_COMPILE_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, str(script), str(run), case], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["training"], proc.communicate(timeout=60)
        children = [int(pid) for pid in line[1:]]
        if case != "compile":  # compile workers may or may not be alive by now; the others are
            assert len(children) >= 2, line
        assert lock_holder(run) == str(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed = time.monotonic()
        assert lock_holder(run) is None  # at once: no child keeps it
        lock = RunLock(run)
        lock.acquire()
        lock.release()
        assert time.monotonic() - killed < 5
        if case != "compile":  # the children outlived the run, so the test shows what it claims
            assert any(alive(pid) for pid in children), children
    finally:
        with suppress(ProcessLookupError):  # the run's children too
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
