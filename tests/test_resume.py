"""Exact resume: after a crash, a SIGKILL at a random moment, or a stop signal, the resumed run ends with weights
bitwise equal to an uninterrupted run; resuming a run that changed is refused with a clear error; the CLI."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cadence import ConfigError
from helpers import CrashAt, make_data
from resume_worker import N_ITEMS, DropoutNet, Items, StartedAt, build

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("resume_worker.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
VAL = make_data(12, seed=2)
MAX_STEPS = 30  # the worker's default run length
SPLITS = ("train", "val")  # the per-step records (epoch summaries have their own test)


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:09d}"


def listing(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise: every parameter and buffer (batch norm statistics included)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k].float() - b[k].float()).abs().max()})"


def records(run: Path, splits: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in found if splits is None or r["split"] in splits]


def record_keys(run: Path, splits: tuple[str, ...] | None = None) -> list[tuple[Any, ...]]:
    return [(r["step"], r["split"], r.get("event")) for r in records(run, splits)]


def assert_no_duplicate_records(run: Path, splits: tuple[str, ...] | None = None) -> None:
    keys = record_keys(run, splits)
    assert len(keys) == len(set(keys)), f"duplicate (step, split) records: {keys}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(name, **overrides)``: the uninterrupted run's final state (each configuration run once)."""
    cache: dict[str, tuple[dict[str, torch.Tensor], Path]] = {}

    def get(name: str, **overrides: Any) -> tuple[dict[str, torch.Tensor], Path]:
        if name not in cache:
            run = tmp_path_factory.mktemp(f"reference-{name}") / "run"
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                t = build(run, **overrides)
                t.fit()
            finally:
                torch.set_num_threads(before)
            cache[name] = (t.model.state_dict(), run)
        return cache[name]

    return get


def crash(run: Path, crash_at: int, **kw: Any) -> None:
    t = build(run, callbacks=[CrashAt(crash_at)], **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.fit()


def resume(run: Path, resume_from: Any = "auto", **kw: Any) -> tuple[Any, list[int]]:
    started = StartedAt()
    t = build(run, resume=resume_from, callbacks=[started], **kw)
    t.fit()
    return t, started.steps


# ----------------------------------------------------------------------------------------------- exact resume
# 52 items, batch 4 x grad_accum 2: 7 steps per epoch, the 7th of 4 items (two micro-batches of 2)
CRASHES = [(7, 10, 7, {"epoch": 0, "position": 7, "end_of_epoch": 1}),
           (3, 11, 9, {"epoch": 1, "position": 2, "end_of_epoch": 0})]
CRASH_IDS = ["checkpoint-at-epoch-end", "checkpoint-mid-epoch"]


@pytest.mark.parametrize(("every", "crash_at", "resumed_at", "position"), CRASHES, ids=CRASH_IDS)
def test_crash_then_resume_auto_is_bitwise_exact(tmp_path, reference, every, crash_at, resumed_at, position):
    kw = dict(val_data=VAL, val_every=4)
    run = tmp_path / "run"
    crash(run, crash_at, checkpoint_every=every, **kw)
    data = json.loads((step_dir(run, resumed_at) / "trainer.json").read_text())["data"]
    assert {k: data.get(k) for k in position} == position

    t, started = resume(run, checkpoint_every=every, **kw)
    assert started == [resumed_at] and t.step == MAX_STEPS
    expected, expected_run = reference("with-val", **kw)
    assert_state_equal(t.model.state_dict(), expected)
    assert_state_equal(load_file(run / "final" / "model.safetensors"), load_file(expected_run / "final" /
                                                                                     "model.safetensors"))
    # the train and val records: each (step, split) once, the same records and losses as the uninterrupted run
    assert_no_duplicate_records(run, SPLITS)
    assert record_keys(run, SPLITS) == record_keys(expected_run, SPLITS)
    assert [r["loss"] for r in records(run, SPLITS)] == [r["loss"] for r in records(expected_run, SPLITS)]


@pytest.mark.parametrize(("every", "crash_at", "resumed_at", "position"), CRASHES, ids=CRASH_IDS)
def test_metrics_after_a_resume_have_no_duplicate_records(tmp_path, reference, every, crash_at, resumed_at,
                                                         position):
    kw = dict(val_data=VAL, val_every=4)
    run = tmp_path / "run"
    crash(run, crash_at, checkpoint_every=every, **kw)
    resume(run, checkpoint_every=every, **kw)
    _, expected_run = reference("with-val", **kw)
    assert_no_duplicate_records(run)
    assert record_keys(run) == record_keys(expected_run)


def test_resume_with_workers_in_a_map_style_dataset(tmp_path, reference):
    kw = dict(data=Items(*make_data(N_ITEMS, seed=1)), num_workers=2)
    run = tmp_path / "run"
    crash(run, 11, checkpoint_every=3, **kw)
    t, started = resume(run, checkpoint_every=3, **kw)
    assert started == [9]
    expected, _ = reference("map-style-workers", **kw)
    assert_state_equal(t.model.state_dict(), expected)


def test_fit_leaves_no_loader_workers_running(tmp_path):
    """Persistent DataLoader workers end with fit(), finished or crashed, not when the Trainer is collected."""
    kw = dict(data=Items(*make_data(N_ITEMS, seed=1)), num_workers=2)
    t = build(tmp_path / "run", max_steps=4, **kw)
    t.fit()
    assert multiprocessing.active_children() == []
    crashed = build(tmp_path / "crash", callbacks=[CrashAt(3)], **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    assert multiprocessing.active_children() == []
    t.max_steps = 8  # a second fit() starts the workers again
    t.fit()
    assert t.step == 8 and multiprocessing.active_children() == []


def test_resume_from_an_explicit_checkpoint_or_run_folder(tmp_path, reference):
    expected, _ = reference("plain")
    run = tmp_path / "run"
    crash(run, 11, checkpoint_every=3)
    assert listing(run) == ["step-000000003", "step-000000006", "step-000000009"]
    t, started = resume(run, step_dir(run, 6), checkpoint_every=3)  # an older one than the newest
    assert started == [6]
    assert_state_equal(t.model.state_dict(), expected)
    assert_no_duplicate_records(run)

    other = tmp_path / "other"
    crash(other, 11, checkpoint_every=3)
    t, started = resume(other, str(other), checkpoint_every=3)  # the run folder: its newest checkpoint
    assert started == [9]
    assert_state_equal(t.model.state_dict(), expected)


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, reference):
    run = tmp_path / "run"
    crash(run, 2, checkpoint_every=3)  # before the first checkpoint
    assert not (run / "checkpoints").exists() or listing(run) == []
    t, started = resume(run, checkpoint_every=3)
    assert started == [0]
    assert_state_equal(t.model.state_dict(), reference("plain")[0])


def test_resume_with_a_higher_max_steps_continues(tmp_path, reference):
    run = tmp_path / "run"
    build(run, max_steps=10, checkpoint_every=5, schedule="constant", val_data=VAL, val_every=5).fit()
    t, started = resume(run, max_steps=MAX_STEPS, checkpoint_every=5, schedule="constant", val_data=VAL,
                        val_every=5)
    assert started == [10] and t.step == MAX_STEPS
    expected, _ = reference("constant", schedule="constant", val_data=VAL, val_every=5)
    assert_state_equal(t.model.state_dict(), expected)
    assert_no_duplicate_records(run)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    build(run, max_steps=12, checkpoint_every=3, val_data=VAL, val_every=4, log_every=5).fit()
    before = record_keys(run)
    t, started = resume(run, max_steps=12, checkpoint_every=3, val_data=VAL, val_every=4, log_every=5)
    assert started == [12] and t.step == 12
    assert_no_duplicate_records(run)
    assert record_keys(run) == before


# ----------------------------------------------------------------------------------------------- mismatches
@pytest.mark.parametrize(("saved", "now", "pieces"), [
    ({}, {"extra_layer": True}, ["missing: net.6.bias, net.6.weight", "net.4.weight (2, 16) vs model (16, 16)"]),
    ({"extra_layer": True}, {}, ["unexpected: net.6.bias, net.6.weight", "net.4.weight (16, 16) vs model (2, 16)"]),
    ({}, {"width": 24}, ["mis-shaped", "net.0.weight (16, 8) vs model (24, 8)", "net.1.running_mean (16,) vs "
                         "model (24,)"]),
], ids=["extra-layer", "layer-removed", "wider"])
def test_resume_with_a_changed_model_lists_the_keys(tmp_path, saved, now, pieces):
    run = tmp_path / "run"
    crash(run, 4, checkpoint_every=3, model=DropoutNet(**saved))
    t = build(run, resume="auto", checkpoint_every=3, model=DropoutNet(**now))
    with pytest.raises(ConfigError) as err:
        t.fit()
    for piece in pieces:
        assert piece in str(err.value)
    assert t.step == 0 and listing(run) == ["step-000000003"]


@pytest.mark.parametrize(("change", "pieces"), [
    ({"batch_size": 8}, ["batch_size 4 -> 8"]),
    ({"data": make_data(40, seed=1)}, ["data_length 52 -> 40"]),
    ({"grad_accum": 1, "seed": 4}, ["grad_accum 2 -> 1", "seed 3 -> 4"]),
], ids=["batch-size", "dataset-length", "grad-accum-and-seed"])
def test_resume_with_changed_data_arguments_is_refused(tmp_path, change, pieces):
    run = tmp_path / "run"
    crash(run, 4, checkpoint_every=3)
    t = build(run, resume="auto", checkpoint_every=3, **change)
    with pytest.raises(ConfigError) as err:
        t.fit()
    for piece in pieces:
        assert piece in str(err.value)
    assert t.step == 0


def test_resume_from_a_folder_without_checkpoints_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    t = build(tmp_path / "run", resume=tmp_path / "empty")
    with pytest.raises(ConfigError, match="no valid checkpoint"):
        t.fit()


# ----------------------------------------------------------------------------------------------- processes
class Server:
    """``resume_worker.py --serve`` in a subprocess: starts runs as forks, reads their lines, signals them.

    Every wait has a deadline, so a hang fails the test instead of blocking it.
    """

    def __init__(self, folder: Path) -> None:
        self.stderr = folder / "server.stderr"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=ENV, bufsize=0)
        self.buffer = b""
        self.eof = False
        self.lines: dict[str, list[str]] = defaultdict(list)
        self.pids: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self.raw: list[str] = []

    def start(self, name: str, run: Path, *args: str) -> None:
        self.proc.stdin.write((shlex.join([name, str(run), *args]) + "\n").encode())
        self.proc.stdin.flush()
        self.wait_for(lambda: name in self.pids, f"{name} to start")

    def until(self, name: str, line: str, timeout: float = 90) -> None:
        """Wait until run ``name`` printed ``line``."""
        def seen() -> bool:
            if line not in self.lines[name] and name in self.codes:
                self.fail(f"{name} ended (exit {self.codes[name]}) before printing {line!r}")
            return line in self.lines[name]

        self.wait_for(seen, f"{line!r} from {name}", timeout)

    def exit_code(self, name: str, timeout: float = 90) -> int:
        self.wait_for(lambda: name in self.codes, f"{name} to exit", timeout)
        return self.codes[name]

    def send(self, name: str, sig: int) -> None:
        self.read(0)  # a run that ended is not signalled
        if name not in self.codes:
            os.kill(self.pids[name], sig)

    def steps(self, name: str) -> list[int]:
        return [int(line.split()[1]) for line in self.lines[name] if line.startswith("step ")]

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.eof:
                self.fail(f"the server ended while waiting for {what}")
            if time.monotonic() > deadline:
                self.fail(f"no {what} within {timeout} s")
            self.read(min(0.5, max(0.0, deadline - time.monotonic())))

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        self.eof = not chunk
        self.buffer += chunk
        while b"\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\n", 1)
            line = raw.decode(errors="replace").strip()
            self.raw.append(line)
            event = re.fullmatch(r"(\S+) (pid|exit) (-?\d+)", line)
            if event is not None:
                name, kind, number = event.groups()
                (self.pids if kind == "pid" else self.codes)[name] = int(number)
            else:
                name, _, rest = line.partition(" ")
                self.lines[name].append(rest)

    def fail(self, message: str) -> None:
        raise AssertionError(f"{message}; the server's last lines: {self.raw[-8:]}; its stderr ends:\n"
                             f"{self.stderr.read_text()[-2000:]}")

    def close(self) -> None:
        self.proc.stdin.close()
        deadline = time.monotonic() + 60
        try:
            while not self.eof and time.monotonic() < deadline:  # keep reading: a full pipe would stall the server
                self.read(0.5)
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
            for name, pid in self.pids.items():  # forks left running by a failed test
                if name not in self.codes:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def early_server(request, tmp_path_factory):
    """Starts the server with this module when a selected test uses it: its imports run beside the tests
    before it."""
    if not any("server" in item.fixturenames for item in request.session.items if item.module is request.module):
        yield None
        return
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(early_server):
    return early_server


def stderr_of(run: Path) -> str:
    path = run.parent / f"{run.name}.stderr"
    return path.read_text()[-2000:] if path.exists() else ""


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path, reference, server):
    """Runs killed at a seeded random step plus a random delay (the first before its first checkpoint), each
    resumed in a new process."""
    rng = random.Random(20240605)
    expected, expected_run = reference("plain")
    for trial in range(4):
        after_step = rng.randrange(0, 2) if trial == 0 else rng.randrange(0, MAX_STEPS - 6)
        delay = rng.uniform(0.0, 0.03)
        run, name = tmp_path / f"trial-{trial}", f"kill-{trial}"
        server.start(name, run, "--checkpoint-every", "3", "--sleep", "0.01")
        server.until(name, f"step {after_step}" if after_step else "started 0")
        time.sleep(delay)
        server.send(name, signal.SIGKILL)
        code = server.exit_code(name)
        last = server.steps(name)[-1] if server.steps(name) else 0
        where = f"trial {trial}: killed {delay:.3f} s after step {after_step}, last step printed {last}"
        assert code == -signal.SIGKILL or (code == 0 and f"done {MAX_STEPS}" in server.lines[name]), where

        server.start(f"resume-{trial}", run, "--checkpoint-every", "3", "--resume")
        assert server.exit_code(f"resume-{trial}") == 0, stderr_of(run)
        resumed = server.lines[f"resume-{trial}"]
        # checkpoint c is committed before "step c+1" is printed; a kill during the save of c loses only c
        resumed_from = int(resumed[0].split()[1])
        assert resumed_from in {3 * ((last - 1) // 3) if last else 0, last - last % 3}, f"{where}: {resumed[0]}"
        assert resumed[-1] == f"done {MAX_STEPS}", where
        assert_state_equal(load_file(run / "final" / "model.safetensors"), expected)
        assert not [n for n in listing(run) if n.startswith(".")], where  # partial saves cleaned up
        # metrics.jsonl: the records of the uninterrupted run, each once (a line cut by the kill is dropped)
        assert record_keys(run) == record_keys(expected_run), where
        assert [r["loss"] for r in records(run)] == [r["loss"] for r in records(expected_run)], where


def test_stop_signals_finish_the_step_save_and_exit(tmp_path, reference, server):
    """SIGTERM exits 143 and SIGINT 130, each after saving the step in progress; the resume is exact."""
    runs = {signal.SIGTERM: tmp_path / "term", signal.SIGINT: tmp_path / "int"}
    for run in runs.values():
        server.start(run.name, run, "--sleep", "0.02", "--max-steps", "200")
    for sig, run in runs.items():
        server.until(run.name, "step 2")
        server.send(run.name, sig)
    expected, _ = reference("200-steps", max_steps=200)
    for sig, run in runs.items():
        code = server.exit_code(run.name)
        assert code == 128 + sig == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], stderr_of(run)
        last = server.steps(run.name)[-1]
        assert 2 <= last < 200 and not any(line.startswith("done") for line in server.lines[run.name])
        assert listing(run) == [f"step-{last:09d}"]  # the step in progress finished and was saved
        assert not (run / "final").exists()

        t, started = resume(run, max_steps=200)
        assert started == [last]
        assert_state_equal(t.model.state_dict(), expected)


class RaiseSignal:
    """Delivers ``signals`` to this process at the end of step ``step`` (as if sent from outside then)."""

    def __init__(self, step: int, *signals: int) -> None:
        self.step, self.signals = step, signals

    def on_step_end(self, trainer: Any) -> None:
        if trainer.step == self.step:
            for sig in self.signals:
                signal.raise_signal(sig)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_stop_signal_in_process_saves_and_exits_then_resumes_exactly(tmp_path, reference, sig, code):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    run = tmp_path / "run"
    t = build(run, callbacks=[RaiseSignal(5, sig)])
    # SIGINT (Ctrl-C) surfaces as KeyboardInterrupt, so Python code can catch it; the others exit with a code
    with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else SystemExit) as exited:
        t.fit()
    assert getattr(exited.value, "code", 130) == code and t.step == 5
    assert listing(run) == ["step-000000005"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # cadence's handlers are removed again
    t, started = resume(run)
    assert started == [5]
    assert_state_equal(t.model.state_dict(), reference("plain")[0])


def test_a_second_sigint_stops_at_once_without_saving(tmp_path):
    run = tmp_path / "run"
    t = build(run, callbacks=[RaiseSignal(5, signal.SIGINT, signal.SIGINT)])
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert t.step == 5
    assert not (run / "checkpoints").exists() or listing(run) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_resume_continues_a_run_and_export_writes_its_weights(tmp_path, capsys):
    from cadence.cli.main import main

    run = tmp_path / "run"
    assert main(["fit", "--trainer.max_steps", "20", "--trainer.warmup_steps", "2", "--trainer.checkpoint_every",
                 "5", "--trainer.progress", "false", "--run-dir", str(run)]) == 0
    assert listing(run) == [f"step-{s:09d}" for s in (5, 10, 15, 20)]
    first = records(run)
    assert first[-1]["step"] == 20
    saved = {s: (step_dir(run, s).stat().st_ino, (step_dir(run, s) / "model.safetensors").read_bytes())
             for s in (5, 10, 15, 20)}

    assert main(["fit", "--resume", str(run), "--trainer.max_steps", "30"]) == 0
    # it continued from step 20: the first run's checkpoints are untouched (a restart would rewrite them) ...
    assert {s: (step_dir(run, s).stat().st_ino, (step_dir(run, s) / "model.safetensors").read_bytes())
            for s in (5, 10, 15, 20)} == saved
    # ... and metrics.jsonl goes on from the first run's records (those written before its last checkpoint)
    after = records(run)
    kept = [r for r in after if r["step"] <= 20]
    assert after[:len(kept)] == kept == first[:len(kept)]
    assert after[len(kept):] and all(r["step"] > 20 for r in after[len(kept):])
    assert_no_duplicate_records(run)
    assert listing(run) == [f"step-{s:09d}" for s in (5, 10, 15, 20, 25, 30)]
    assert json.loads((step_dir(run, 30) / "trainer.json").read_text())["step"] == 30
    assert "max_steps: 30" in (run / "config.yaml").read_text()
    final = load_file(run / "final" / "model.safetensors")
    assert_state_equal(load_file(step_dir(run, 30) / "model.safetensors"), final)

    out = tmp_path / "export" / "model.safetensors"
    assert main(["export", str(run), "-o", str(out)]) == 0
    assert_state_equal(load_file(out), final)
    assert out.read_bytes() == (step_dir(run, 30) / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(out), "--overwrite"]) == 0
