"""Several processes on the CPU (gloo), launched by torchrun as users would: equivalence with one process,
FSDP2, a two-node rendezvous on 127.0.0.1, kill-and-resume, and faults that must never hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
           str(free_port()), *extra, str(WORKER), str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)


def single(out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(WORKER), str(out), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)


def weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(out / f"weights-rank{rank}.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """One process, grad_accum=2: the same global batches as two processes with grad_accum=1."""
    out = tmp_path_factory.mktemp("single")
    proc = single(out, "--grad-accum", "2")
    assert proc.returncode == 0, proc.stderr
    return weights(out)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(out, "--checkpoint-every", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ddp_two_processes_match_one_with_accumulation(ddp_run: Path, reference: dict) -> None:
    assert_equal(weights(ddp_run, 0), weights(ddp_run, 1))  # replicas stay identical
    assert_close(weights(ddp_run), reference)
    # rank 0 alone wrote the run folder; validation was all-reduced, so it equals the one-process value
    run = ddp_run / "run"
    assert (run / "metrics.jsonl").exists() and (run / "final" / "model.safetensors").exists()
    assert_close(load_file(run / "final" / "model.safetensors"), reference)
    files = sorted(p.name for p in (run / "checkpoints" / "step-000000012").iterdir())
    assert "rng-rank00000.safetensors" in files and "rng-rank00001.safetensors" in files
    assert "model.safetensors" in files  # DDP saves the replicated weights once


def test_fsdp_two_processes_match_one(tmp_path: Path, reference: dict) -> None:
    proc = torchrun(tmp_path, "--strategy", "fsdp", "--checkpoint-every", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(weights(tmp_path), reference)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000000012"
    names = sorted(p.name for p in ckpt.iterdir())
    for rank in (0, 1):
        assert f"model-rank{rank:05d}.safetensors" in names and f"optimizer-rank{rank:05d}.safetensors" in names
    manifest = (ckpt / "manifest.json").read_text()
    assert all(name in manifest for name in names if name != "manifest.json")  # the manifest covers every shard
    assert not any(p.read_bytes()[:1] == b"\x80" for p in ckpt.iterdir())  # no pickle
    assert_close(load_file(tmp_path / "run" / "final" / "model.safetensors"), reference)
    # cadence export joins the newest checkpoint's shards (rank 0's model-shards.json says how) into whole tensors
    from cadence.cli.main import main

    out = tmp_path / "export.safetensors"
    assert main(["export", str(tmp_path / "run"), "-o", str(out)]) == 0
    assert_equal(load_file(out), load_file(tmp_path / "run" / "final" / "model.safetensors"))


def test_two_node_rendezvous_on_localhost(tmp_path: Path, reference: dict) -> None:
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", port, str(WORKER), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    assert_close(weights(tmp_path, 0), reference)
    assert_equal(weights(tmp_path, 0), weights(tmp_path, 1))


def test_sigterm_to_one_rank_saves_everywhere_and_resumes_bitwise(tmp_path: Path, ddp_run: Path) -> None:
    proc = torchrun(tmp_path, "--checkpoint-every", "4", "--signal-at-step", "6", "--signal-rank", "1")
    assert proc.returncode != 0
    assert "exitcode  : 143" in proc.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000000004", "step-000000006"]  # every rank stopped and saved at step 6
    resumed = torchrun(tmp_path, "--checkpoint-every", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_equal(weights(tmp_path), weights(ddp_run))


def test_a_rank_that_raises_stops_all_without_hanging(tmp_path: Path) -> None:
    proc = torchrun(tmp_path, "--crash-at-step", "5", "--crash-rank", "1")
    assert proc.returncode != 0
    assert "fails on purpose" in proc.stderr
    assert not (tmp_path / "weights-rank0.safetensors").exists()


def test_nonfinite_loss_on_one_rank_is_skipped_on_all(tmp_path: Path) -> None:
    proc = torchrun(tmp_path, "--nan-at-step", "4", "--nan-rank", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped=1") == 2
    assert_equal(weights(tmp_path, 0), weights(tmp_path, 1))


@pytest.mark.parametrize("given", [True, False], ids=["run-dir", "default-folder"])
def test_cadence_fit_nproc_launches_through_torchrun(tmp_path: Path, given: bool) -> None:
    """With checkpoints: the launcher's one check of the config knows the workers get a run folder (the one
    given, or the default one it makes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    folder = ["--run-dir", str(tmp_path / "run")] if given else []
    proc = subprocess.run([sys.executable, "-m", "cadence", "fit", "--nproc", "2", "--master-port", str(free_port()),
                           "--trainer.max_steps", "12", "--trainer.warmup_steps", "2", "--trainer.device", "cpu",
                           "--trainer.progress", "false", "--trainer.checkpoint_every", "6", *folder],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step=12") == 1  # rank 0 alone reports
    run = tmp_path / "run" if given else next((tmp_path / "runs").iterdir())
    assert (run / "config.yaml").exists() and (run / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000006", "step-000000012"]


def test_find_unused_parameters_lets_ddp_train_a_model_with_parameters_no_step_uses(tmp_path: Path) -> None:
    refused = torchrun(tmp_path / "refused", "--unused", "--steps", "3")
    assert refused.returncode != 0 and "find_unused_parameters" in refused.stderr  # DDP's own error names it
    proc = torchrun(tmp_path / "found", "--unused", "--find-unused", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal(weights(tmp_path / "found", 0), weights(tmp_path / "found", 1))
    assert "spare.weight" in weights(tmp_path / "found", 0)


def streamed_items(out: Path, rank: int) -> list[int]:
    """The items rank ``rank``'s stream yielded, in order, over every run into ``out``."""
    text = (out / f"items-rank{rank}.txt").read_text()
    return [int(tok) for line in text.splitlines() if ":" in line for tok in line.split(":", 1)[1].split()]


def test_a_stateful_stream_per_rank_resumes_at_two_processes_without_replay(tmp_path: Path) -> None:
    """Each rank streams its own share of the items (the documented rule for iterables under DDP), from an
    IterableDataset with state. A SIGTERM mid-epoch and a resume: the ranks go on from their saved positions,
    no item is yielded twice or skipped, nothing warns of a replay, and the weights are bitwise those of the
    uninterrupted run, equal on both ranks."""
    full = torchrun(tmp_path / "full", "--stream", "--checkpoint-every", "4")
    assert full.returncode == 0, full.stderr[-3000:]
    cut = tmp_path / "cut"
    stopped = torchrun(cut, "--stream", "--checkpoint-every", "4", "--signal-at-step", "6")
    assert "exitcode  : 143" in stopped.stderr
    resumed = torchrun(cut, "--stream", "--checkpoint-every", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has no state_dict()" not in resumed.stderr
    assert "epoch 0 from 48:" in (cut / "items-rank0.txt").read_text()  # step 6 of 8-item batches
    for rank in (0, 1):
        items = streamed_items(tmp_path / "full", rank)
        assert items and all(i % 2 == rank for i in items)  # its own share
        assert streamed_items(cut, rank) == items  # stopped + resumed: the same items, none twice
        assert_equal(weights(cut, rank), weights(tmp_path / "full", rank))
    assert_equal(weights(tmp_path / "full", 0), weights(tmp_path / "full", 1))


def test_augmented_items_are_the_same_at_one_and_two_processes_and_resume_bitwise(tmp_path: Path) -> None:
    """Items drawing random noise in __getitem__: seeded per item, two processes see what one process with twice
    the accumulation sees; a SIGTERM mid-run and a resume end where the uninterrupted run does."""
    one = single(tmp_path / "one", "--grad-accum", "2", "--augment")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(tmp_path / "two", "--augment", "--checkpoint-every", "4")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
    cut = tmp_path / "cut"
    stopped = torchrun(cut, "--augment", "--checkpoint-every", "4", "--signal-at-step", "6")
    assert "exitcode  : 143" in stopped.stderr
    resumed = torchrun(cut, "--augment", "--checkpoint-every", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_equal(weights(cut), weights(tmp_path / "two"))
