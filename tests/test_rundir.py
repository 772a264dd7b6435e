"""The run folder: its lock, unique default names, what overwrite removes, checks before writing, file modes,
and strict JSON in metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cadence import ConfigError
from cadence.loggers.jsonl import JsonlLogger, read_jsonl
from cadence.rundir import RunLock, check_run_dir, clear_run, records_until, unique_run_dir
from helpers import MLP, make_data, trainer

ROOT = Path(__file__).resolve().parents[1]


def strict_lines(path: Path) -> list[dict]:
    """Every line of ``path`` read by a strict JSON parser (bare NaN/Infinity rejected)."""
    def reject(name: str) -> None:
        raise ValueError(f"bare {name}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def small_run(run: Path, **kw) -> None:
    kw.setdefault("max_steps", 2)
    trainer(MLP(), make_data(32), batch_size=8, log_every=1, checkpoint_every=1, run_dir=run, **kw).fit()


# ----------------------------------------------------------------------------------------------- the lock
def lock_from_another_process(run: Path) -> subprocess.Popen:
    """A process that takes ``run``'s lock and holds it until killed (read ``locked`` from its stdout first)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from cadence.rundir import RunLock; "
         f"RunLock(Path({str(run)!r})).acquire(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_a_locked_folder_is_refused_naming_it_and_the_pid(tmp_path):
    run = tmp_path / "run"
    holder = lock_from_another_process(run)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = trainer(MLP(), make_data(32), batch_size=8, max_steps=2, run_dir=run)
        with pytest.raises(ConfigError) as err:
            t.fit()
        assert str(run) in str(err.value) and f"PID {holder.pid}" in str(err.value)
        assert not (run / "metrics.jsonl").exists()
        holder.kill()  # SIGKILL: the kernel drops the lock, nothing stale is left
        holder.wait(timeout=30)
        t.fit()
        assert t.step == 2 and not (run / ".lock").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_new_run_into_a_folder_in_training_names_the_pid_not_the_old_run(tmp_path):
    """Without resume or overwrite, a folder that holds a run still training is refused for that reason."""
    run = tmp_path / "run"
    small_run(run)
    holder = lock_from_another_process(run)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"PID {holder.pid}") as err:
            trainer(MLP(), make_data(32), batch_size=8, max_steps=2, run_dir=run)
        assert "already holds a run" not in str(err.value)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with pytest.raises(ConfigError, match="already holds a run"):  # the holder is gone: the old run is what is left
        trainer(MLP(), make_data(32), batch_size=8, max_steps=2, run_dir=run)


def test_the_lock_is_held_while_fit_runs_and_released_after(tmp_path):
    run = tmp_path / "run"
    seen = []

    class Probe:
        def on_step_end(self, t):
            other = RunLock(run)
            with pytest.raises(ConfigError, match=f"PID {os.getpid()}"):
                other.acquire()
            seen.append(t.step)

    small_run(run, callbacks=[Probe()])
    assert seen == [1, 2]
    lock = RunLock(run)
    lock.acquire()  # free again
    lock.release()


def test_a_failed_fit_releases_the_lock(tmp_path):
    run = tmp_path / "run"
    small_run(run)
    t = trainer(MLP(), make_data(32), batch_size=16, max_steps=4, run_dir=run, resume="auto")
    with pytest.raises(ConfigError, match="batch_size"):
        t.fit()
    lock = RunLock(run)
    lock.acquire()
    lock.release()


# ----------------------------------------------------------------------------------------------- names
def test_default_names_never_collide(tmp_path):
    base = tmp_path / "runs" / "20260101-000000-demo"
    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(unique_run_dir(base))) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(made)) == 6 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made)[0] == base.name


# ----------------------------------------------------------------------------------------------- overwrite
def test_overwrite_removes_only_what_cadence_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    small_run(run, max_steps=3)
    (run / "notes.md").write_text("mine")
    (run / "checkpoints" / "notes.txt").write_text("mine too")
    foreign = run / "checkpoints" / "step-000000099"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("not cadence's")
    (run / "final" / "extra.txt").write_text("mine as well")
    with pytest.raises(ConfigError, match="already holds a run"):
        trainer(MLP(), make_data(32), batch_size=8, max_steps=2, run_dir=run)
    small_run(run, max_steps=2, overwrite=True)
    err = capsys.readouterr().err
    assert "removed" in err and "checkpoints/step-000000003" in err and "metrics.jsonl" in err
    assert (run / "notes.md").read_text() == "mine"
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine too"
    assert (foreign / "weights.bin").read_text() == "not cadence's"
    assert (run / "final" / "extra.txt").read_text() == "mine as well"
    assert not (run / "checkpoints" / "step-000000003").exists()
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 2


def test_clear_run_lists_what_it_removed(tmp_path):
    run = tmp_path / "run"
    small_run(run)
    removed = clear_run(run)
    assert {"metrics.jsonl", "final/model.safetensors", "checkpoints/step-000000001"} <= set(removed)
    assert not run.exists() or list(run.iterdir()) == []


def test_a_folder_holding_no_run_is_not_a_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "README.md").write_text("notes")
    (run / "checkpoints" / "keep.txt").write_text("mine")
    check_run_dir(run, overwrite=False)  # no error
    small_run(run)
    assert (run / "README.md").read_text() == "notes" and (run / "checkpoints" / "keep.txt").exists()


# ----------------------------------------------------------------------------------------------- checks first
def test_nothing_is_written_before_the_arguments_are_checked(tmp_path):
    run = tmp_path / "run"
    small_run(run)
    before = files(run)
    for bad_kw in ({"lr": -1.0}, {"optimizer": "adamz"}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            trainer(MLP(), make_data(32), max_steps=2, run_dir=run, overwrite=True, **{"batch_size": 8, **bad_kw})
    assert files(run) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError):
        trainer(MLP(), make_data(32), batch_size=8, max_steps=2, lr=-1.0, run_dir=fresh)
    assert not fresh.exists()


def test_a_failed_resume_changes_nothing_and_a_retry_works(tmp_path):
    run = tmp_path / "run"
    small_run(run)
    before = files(run)
    with pytest.raises(ConfigError, match="batch_size"):
        trainer(MLP(), make_data(32), batch_size=16, max_steps=4, run_dir=run, resume="auto").fit()
    with pytest.raises(ConfigError, match="max_steps"):
        trainer(MLP(), make_data(32), batch_size=8, max_steps=1, run_dir=run, resume="auto").fit()
    assert files(run) == before
    t = trainer(MLP(), make_data(32), batch_size=8, max_steps=4, log_every=1, checkpoint_every=1, run_dir=run,
                resume="auto")
    t.fit()
    assert t.step == 4


def test_resume_with_no_usable_checkpoint_says_so(tmp_path, capsys):
    t = trainer(MLP(), make_data(32), batch_size=8, max_steps=2, run_dir=tmp_path / "run", resume="auto")
    t.fit()
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step 0" in err


def test_unwritable_and_overlong_folders_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="shorter"):
        check_run_dir(tmp_path / ("a" * 300), overwrite=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(blocker / "run", overwrite=False)
    monkeypatch.setattr("cadence.rundir.os.access", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="cannot write"):
        check_run_dir(tmp_path / "run", overwrite=False)


# ----------------------------------------------------------------------------------------------- keep_best
def test_keep_best_of_a_name_never_logged_is_an_error_at_the_first_validation(tmp_path):
    x, y = make_data(48)
    t = trainer(MLP(), (x, y), val_data=make_data(16, seed=1), batch_size=8, max_steps=8, val_every=2,
                checkpoint_every=1, keep_last=1, keep_best=("val/acc", "max"), run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="keep_best.*val/acc.*val/loss"):
        t.fit()
    assert t.step == 2


def test_best_checkpoint_is_the_kept_best(tmp_path):
    x, y = make_data(48)
    vx, vy = make_data(16, seed=1)
    t = trainer(MLP(), (x, y), val_data=(vx, 1 - vy), batch_size=8, max_steps=12, lr=0.02, val_every=2,
                checkpoint_every=2, keep_last=1, keep_best=("val/loss", "min"), run_dir=tmp_path / "run")
    assert t.best_checkpoint is None
    t.fit()
    val = {r["step"]: r["loss"] for r in t.history if r["split"] == "val"}
    assert t.best_checkpoint == tmp_path / "run" / "checkpoints" / f"step-{min(val, key=val.get):09d}"
    assert t.best_checkpoint.is_dir()


def test_keep_best_needs_validation_data(tmp_path):
    with pytest.raises(ConfigError, match="keep_best"):
        trainer(MLP(), make_data(32), max_steps=2, keep_best=("val/loss", "min"), run_dir=tmp_path / "run")


# ----------------------------------------------------------------------------------------------- files
def test_files_are_written_with_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        small_run(tmp_path / "run")
    finally:
        os.umask(old)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o644, path


def test_metrics_jsonl_is_strict_json_and_reads_back_non_finite_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"step": 1, "split": "train", "loss": math.nan, "parts": {"a": math.inf, "b": 1.0}, "lr": 0.1})
    logger.log({"step": 2, "split": "train", "event": "nonfinite", "value": -math.inf})
    logger.close()
    lines = strict_lines(path)
    assert lines[0]["loss"] == "NaN" and lines[0]["parts"]["a"] == "Infinity" and lines[1]["value"] == "-Infinity"
    first, second = read_jsonl(path)
    assert math.isnan(first["loss"]) and first["parts"] == {"a": math.inf, "b": 1.0} and second["value"] == -math.inf


def test_a_skipped_nonfinite_step_is_logged_as_strict_json(tmp_path):
    class NanOnce(MLP):
        calls = 0

        def forward(self, x, y):
            NanOnce.calls += 1
            loss = super().forward(x, y)
            return loss * math.nan if NanOnce.calls == 2 else loss

    run = tmp_path / "run"
    trainer(NanOnce(), make_data(32), batch_size=8, max_steps=3, log_every=1, on_nonfinite="skip",
            run_dir=run).fit()
    events = [r for r in strict_lines(run / "metrics.jsonl") if r.get("event") == "nonfinite"]
    assert events and events[0]["value"] == "NaN"


def test_damaged_lines_are_skipped_with_one_warning_and_dropped_on_resume(tmp_path):
    run = tmp_path / "run"
    small_run(run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\x00\xff\xfe garbage\n{\"step\": \"abc\", \"split\": \"train\"}\n[1, 2]\n")
    with pytest.warns(UserWarning, match="metrics.jsonl: skipped 3 damaged") as caught:
        records = read_jsonl(run / "metrics.jsonl")
        read_jsonl(run / "metrics.jsonl")
    assert len([w for w in caught if "damaged" in str(w.message)]) == 1
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    kept = records_until(run / "metrics.jsonl", 2)
    assert kept == records and len(strict_lines(run / "metrics.jsonl")) == len(records)
    t = trainer(MLP(), make_data(32), batch_size=8, max_steps=3, log_every=1, run_dir=run, resume="auto")
    t.fit()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]


def test_with_several_processes_rank_0_holds_the_lock_and_all_ranks_stop(tmp_path):
    import socket

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built in")
    lock = RunLock(tmp_path / "run")  # dist_worker.py trains in OUT/run
    lock.acquire()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(ROOT / "tests" / "dist_worker.py"), str(tmp_path), "--checkpoint-every", "4"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        lock.release()
    assert proc.returncode != 0
    assert f"PID {os.getpid()}" in proc.stderr and "rank 0 could not take the run folder" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
