"""Exact resume at every kill point (issue 26): a run SIGKILLed exactly at a named point of a given step
(``CADENCE_KILL_AT``, cadence/killpoints.py), then resumed with ``cadence fit --resume RUN``, ends with final
weights, EMA weights, optimizer state, random generators, metrics.jsonl (no record twice, none missing) and
checkpoints equal, bit for bit, to those of the uninterrupted run.

The runs are ``cadence fit`` commands, each in a fork of a process that imported cadence once
(tests/kill_zygote.py), two at a time; ``--nproc 2`` runs are real launches.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadence.killpoints import POINTS
from cadence.loggers.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The demo, smaller: 410 digits, 328 of them trained in batches of 32, so an epoch is 11 steps (the last one
# short). Checkpoints every 4 steps (4 the first, 44 also an epoch end, 46 the last, at the end of the run),
# validation every 6 (12 is a validation and a checkpoint), a log every 5.
DEMO = ["--data.n", "410", "--trainer.batch_size", "32", "--trainer.max_steps", "46", "--trainer.warmup_steps", "5",
        "--trainer.checkpoint_every", "4", "--trainer.val_every", "6", "--trainer.log_every", "5",
        "--trainer.progress", "false"]

# Every option that changes what a checkpoint holds or how it is written, together: grad_accum, keep_last,
# keep_best, EMA, async checkpoints, 2 DataLoader workers over a dataset that augments each item at random.
RICH_PY = '''
import random
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class Noisy(Dataset):
    """Items with noise drawn from torch, numpy and random in __getitem__ (augmentation)."""

    def __init__(self, n: int = 200) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        noise = torch.randn(8) * 0.1 + float(np.random.rand()) * 0.01 + random.random() * 0.01
        return self.x[i] + noise, self.y[i]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.net(x), y)
'''
RICH_YAML = """
model:
  class_path: everything.Net
data:
  class_path: everything.Noisy
trainer:
  batch_size: 8
  grad_accum: 2
  max_steps: 26
  lr: 0.01
  valid_frac: 0.2
  val_every: 4
  log_every: 3
  checkpoint_every: 5
  keep_last: 2
  keep_best: [val/loss, min]
  ema:
    beta: 0.9
    update_after: 2
  async_checkpoint: true
  num_workers: 2
  progress: false
"""
# 160 items, 16 a step: an epoch is 10 steps. Checkpoints at 5, 10 (epoch end), ..., 25 and 26 (the end).

TIMING = {"elapsed_s", "samples_per_s", "tokens_per_s", "steps_per_s"}


class Zygotes:
    """Two kill_zygote.py processes; ``run`` takes a free one."""

    def __init__(self, n: int = 2) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.free: queue.Queue = queue.Queue()
        self.procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_zygote.py")], env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)]
        for proc in self.procs:
            self.free.put(proc)

    def run(self, cwd: Path, argv: list[str], kill: str | None = None, env: dict | None = None) -> dict:
        """``cadence ARGV`` run in ``cwd`` with the kill point ``kill`` armed and ``env`` added."""
        proc = self.free.get()
        try:
            proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "kill": kill, "env": env or {}}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, "the zygote died"
            return json.loads(line)
        finally:
            self.free.put(proc)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()  # idle between requests: nothing of its own to finish
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygotes() -> Iterator[Zygotes]:
    z = Zygotes()
    yield z
    z.close()


def outputs(cwd: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(cwd.glob("out-*.txt")))


def run_state(run: Path) -> dict:
    """Everything of a finished run that must not depend on where it was killed."""
    final = {name: load_file(run / "final" / name) for name in ("model.safetensors", "ema.safetensors")
             if (run / "final" / name).exists()}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    last = run / "checkpoints" / checkpoints[-1]
    tensors = {p.name: load_file(p) for p in sorted(last.glob("*.safetensors"))}
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")]
    return {"final": final, "checkpoints": checkpoints, "last": tensors, "records": records}


def assert_same(got: dict, want: dict, where: str) -> None:
    assert got["checkpoints"] == want["checkpoints"], where
    for group in ("final", "last"):
        assert got[group].keys() == want[group].keys(), (where, group)
        for name, tensors in want[group].items():
            assert tensors.keys() == got[group][name].keys(), (where, name)
            for key, value in tensors.items():
                assert torch.equal(got[group][name][key], value), f"{where}: {name} {key} differs"
    steps = [(r["step"], r["split"], r.get("event")) for r in got["records"]]
    assert len(steps) == len(set(steps)), f"{where}: a record twice: {steps}"
    assert got["records"] == want["records"], where


def kill_and_resume(z: Zygotes, cwd: Path, argv: list[str], kills: list[str], launch: list[str]) -> Path:
    """Start ``argv`` into ``cwd/run``, killed at ``kills[0]``; each further kill is a resume killed there; then
    a last resume to the end. A run killed before it wrote config.yaml is started again as it was. With
    ``launch`` (``--nproc 2``) the workers read the kill point from the environment, and the launcher says
    that one was killed."""
    run = cwd / "run"
    command = [*argv, "--run-dir", str(run)]
    for i, kill in enumerate([*kills, None]):
        if i > 0 and (run / "config.yaml").exists():
            command = ["fit", "--resume", str(run), *launched(launch)]
        if launch:
            answer = z.run(cwd, launched(command), None, {"CADENCE_KILL_AT": kill} if kill else None)
        else:
            answer = z.run(cwd, command, kill)
        if kill is None:
            assert answer == {"exit": 0}, f"{kills}: {answer}\n{outputs(cwd)}"
        elif launch:  # the point must be reached, or the case tests nothing
            killed = re.search(r"exit codes \[[^]]*-9\b", outputs(cwd))
            assert answer == {"exit": 1} and killed, f"{kill}: {answer}\n{outputs(cwd)}"
        else:
            assert answer == {"signal": 9}, f"{kill}: {answer}\n{outputs(cwd)}"
    return run


def launched(argv: list[str]) -> list[str]:
    """``argv`` with a free ``--master-port`` when it launches processes (two launches run at once)."""
    if "--nproc" not in argv:
        return argv
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [*[a for i, a in enumerate(argv) if "--master-port" not in argv[max(i - 1, 0):i + 1]],
            "--master-port", str(port)]


def sweep(z: Zygotes, tmp: Path, setup, argv: list[str], cases: list[list[str]], launch: list[str] = ()) -> None:
    """The uninterrupted run, then every case (a list of kill points), two at a time; all must match."""
    def fresh(name: str) -> Path:
        cwd = tmp / name
        cwd.mkdir()
        setup(cwd)
        return cwd

    reference = fresh("reference")
    assert z.run(reference, launched([*argv, *launch, "--run-dir", str(reference / "run")])) == {"exit": 0}, \
        outputs(reference)
    want = run_state(reference / "run")

    def one(index: int, kills: list[str]) -> str | None:
        cwd = fresh(f"case-{index}")
        try:
            run = kill_and_resume(z, cwd, [*argv, *launch], kills, list(launch))
            assert_same(run_state(run), want, " then ".join(kills))
        except AssertionError as err:
            return f"{' then '.join(kills)}: {err}"
        shutil.rmtree(cwd)
        return None

    with ThreadPoolExecutor(len(z.procs)) as pool:
        failures = [f for f in pool.map(one, range(len(cases)), cases) if f is not None]
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)


def spec(point: str, step: int) -> str:
    """``NAME#N`` at ``step``: ``NAME@STEP#N``."""
    name, _, nth = point.partition("#")
    return f"{name}@{step}" + (f"#{nth}" if nth else "")


def at(points: list[str], steps: list[int]) -> list[list[str]]:
    return [[spec(p, s)] for p in points for s in steps]


STEP = ["step.begin", "step.forward", "step.backward", "step.optimizer", "step.end"]
CHECKPOINT = ["checkpoint.capture", "checkpoint.file#1", "checkpoint.file#3", "checkpoint.manifest",
              "checkpoint.fsync", "checkpoint.rename", "checkpoint.committed"]
END = ["end.validated", "end.checkpoint", "end.final", "end.done"]
# a resume killed in its turn (after a first kill at a step after a checkpoint)
RESUME = ["start", "locked", "resume.found", "resume.loaded", "metrics.truncate", "metrics.truncated", "started"]


def test_every_point_is_covered() -> None:
    named = {p.partition("#")[0] for p in STEP + CHECKPOINT + END + RESUME}
    named |= {"metrics.write", "log", "val.batch", "val.end", "checkpoint.prune"}
    assert named == set(POINTS)


def test_the_demo_resumes_bitwise_from_a_kill_at_every_point(zygotes: Zygotes, tmp_path: Path) -> None:
    cases = [["start@0"], ["locked@0"], ["started@0"]]
    cases += at(STEP, [1, 12, 45])
    cases += [["metrics.write@5#1"], ["log@5"], ["metrics.write@6#2"], ["val.batch@6#1"], ["val.batch@6#2"],
              ["val.end@6"], ["val.end@12"]]
    cases += at(CHECKPOINT, [4, 12, 44, 46])
    cases += at(END, [46])
    cases += [["step.begin@23", p] for p in RESUME]  # the resume killed at p, whatever its step
    sweep(zygotes, tmp_path, lambda cwd: None, ["fit", *DEMO], cases)


def test_a_run_with_every_checkpoint_option_resumes_bitwise_from_a_kill_at_every_point(
        zygotes: Zygotes, tmp_path: Path) -> None:
    def setup(cwd: Path) -> None:
        (cwd / "everything.py").write_text(RICH_PY)
        (cwd / "everything.yaml").write_text(RICH_YAML)

    cases = at(["step.forward#2", "step.backward#1", "step.end"], [3, 10, 26])
    cases += [["val.batch@8#1"], ["val.end@8"], ["metrics.write@9#1"]]
    cases += at(CHECKPOINT, [5, 10, 26])
    cases += at(["checkpoint.prune#1"], [15, 20, 25])
    cases += at(END, [26])
    cases += [["step.begin@12", "resume.loaded"], ["step.begin@12", "metrics.truncated"]]
    sweep(zygotes, tmp_path, setup, ["fit", "--config", "everything.yaml"], cases)


def test_two_processes_resume_bitwise_from_a_kill_of_either_rank(zygotes: Zygotes, tmp_path: Path) -> None:
    """``--nproc 2``: one rank killed inside a step, while writing its share of a checkpoint, after the commit
    and at the end; torchrun ends the other, and ``cadence fit --resume RUN --nproc 2`` ends bitwise."""
    argv = ["fit", *DEMO[:2], "--trainer.batch_size", "16", *DEMO[4:]]
    cases = [["step.backward@10:1"], ["checkpoint.file@12#1:1"], ["checkpoint.committed@12:0"], ["end.final@46:0"]]
    sweep(zygotes, tmp_path, lambda cwd: None, argv, cases, ["--nproc", "2"])


def test_a_kill_point_that_does_not_exist_is_an_error_naming_the_points() -> None:
    from cadence import killpoints

    with pytest.raises(ValueError, match="CADENCE_KILL_AT='step.fwd@3'.*step.forward"):
        killpoints.arm("step.fwd@3")
    with pytest.raises(ValueError, match="NAME\\[@STEP\\]"):
        killpoints.arm("step.forward@three")
    killpoints.arm(None)
    assert not killpoints.ACTIVE

