"""Resuming at another number of processes (CPU, gloo): the global batch is kept by adapting grad_accum, every item
of the epoch is trained exactly once across the change, and the final weights match the uninterrupted run at the
new world size; a resume that cannot keep the global batch stops before it writes anything."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cadence.checkpoint import resize
from cadence.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "resize_worker.py"
TIMEOUT = 240


def launch(out: Path, run: Path, *args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    """The worker alone (``nproc=0``: a single process, no torchrun) or under torchrun with ``nproc`` processes."""
    from test_distributed import TORCHRUN, free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
           str(free_port())] if nproc else [sys.executable]
    proc = subprocess.run([*cmd, str(WORKER), str(out), str(run), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(out: Path, rank: int = 0, kind: str = "weights") -> dict[str, torch.Tensor]:
    return load_file(out / f"{kind}-rank{rank}.safetensors")


def with_ema(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return {**weights(out, rank), **{f"ema.{k}": v for k, v in weights(out, rank, "ema").items()}}


def model_only(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in reference.items() if not k.startswith("ema.")}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def trained_items(*outs: Path) -> Counter:
    """How often each item went through a training forward, over every rank of the given runs."""
    counts: Counter = Counter()
    for out in outs:
        for log in out.glob("items-rank*.txt"):
            counts.update(int(i) for line in log.read_text().split("\n") for i in line.split())
    return counts


def folder_state(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run at one process: grad_accum 2, a global batch of 8 (one epoch of 64 items)."""
    out = tmp_path_factory.mktemp("one")
    launch(out, out / "run", "--grad-accum", "2", "--ema")
    assert trained_items(out) == Counter(range(64))
    return with_ema(out)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run at two processes (DDP): grad_accum 1, the same global batch of 8."""
    out = tmp_path_factory.mktemp("two")
    launch(out, out / "run", "--ema", nproc=2)
    assert_close(weights(out, 1), weights(out, 0))
    return with_ema(out)


def test_ddp_two_processes_resume_at_one_adapting_grad_accum(tmp_path: Path, one: dict) -> None:
    run = tmp_path / "run"
    launch(tmp_path / "before", run, "--steps", "3", "--ema", nproc=2)
    proc = launch(tmp_path / "after", run, "--resume", "--ema")  # grad_accum 1 as at two processes: adapted
    assert "resume at 1 process from a checkpoint of 2: grad_accum 1 -> 2 keeps the global batch of 8" in proc.stderr
    assert "grad_accum=2" in proc.stdout
    assert trained_items(tmp_path / "before", tmp_path / "after") == Counter(range(64))  # each item once
    assert_close(with_ema(tmp_path / "after"), one)  # the EMA too


def test_ddp_one_process_resumes_at_two_and_a_resume_that_cannot_keep_the_batch_writes_nothing(
        tmp_path: Path, two: dict) -> None:
    run = tmp_path / "run"
    launch(tmp_path / "before", run, "--grad-accum", "2", "--steps", "3", "--ema")
    before = folder_state(run)
    from test_distributed import TORCHRUN, free_port

    failed = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), str(WORKER),
                             str(tmp_path / "refused"), str(run), "--resume", "--batch-size", "3"],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert failed.returncode != 0
    assert "global batch would change from 8 (batch_size 4 x grad_accum 2 x 1 process) to 6" in failed.stderr
    assert "batch_size=4 with grad_accum=1" in failed.stderr and "new_global_batch=True" in failed.stderr
    assert folder_state(run) == before
    proc = launch(tmp_path / "after", run, "--resume", "--grad-accum", "2", "--ema", nproc=2)
    assert "grad_accum 2 -> 1 keeps the global batch of 8 (batch_size 4 x grad_accum 1 x 2 processes)" in proc.stderr
    assert trained_items(tmp_path / "before", tmp_path / "after") == Counter(range(64))
    assert_close(with_ema(tmp_path / "after", 0), two)
    assert_close(with_ema(tmp_path / "after", 1), two)


def test_fsdp_two_processes_resume_in_a_single_process(tmp_path: Path, one: dict) -> None:
    run = tmp_path / "run"
    launch(tmp_path / "before", run, "--strategy", "fsdp", "--steps", "3", nproc=2)
    launch(tmp_path / "after", run, "--resume")  # whole tensors joined from the two ranks' shards
    assert trained_items(tmp_path / "before", tmp_path / "after") == Counter(range(64))
    assert_close(weights(tmp_path / "after"), model_only(one))


def test_a_single_process_resumes_under_fsdp_at_two_then_fsdp_reshards_from_two_to_four(tmp_path: Path,
                                                                                      two: dict) -> None:
    run = tmp_path / "run"
    launch(tmp_path / "before", run, "--grad-accum", "2", "--steps", "3")
    launch(tmp_path / "middle", run, "--strategy", "fsdp", "--grad-accum", "2", "--steps", "5", "--resume", nproc=2)
    # four ranks, each a quarter of every tensor (a 3-row bias: 1, 1, 1 and 0 rows) read from two ranks' shards
    launch(tmp_path / "after", run, "--strategy", "fsdp", "--batch-size", "2", "--resume", nproc=4)
    assert trained_items(tmp_path / "before", tmp_path / "middle", tmp_path / "after") == Counter(range(64))
    for rank in range(4):
        assert_close(weights(tmp_path / "after", rank), model_only(two))


def test_a_rank_reads_only_the_rows_it_holds_from_the_shards_that_hold_them(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from cadence.distributed import reshard

    whole = torch.arange(30.0).reshape(10, 3)
    for r, (a, z) in enumerate(reshard.rows_of(10, 3, r) for r in range(3)):  # 4, 4 and 2 rows
        save_file({"w": whole[a:z].clone(), "s": torch.tensor(1.0)}, str(tmp_path / f"model-rank{r:05d}.safetensors"))
    (tmp_path / "model-shards.json").write_text('{"world_size": 3, "sharded": {"w": {"dim": 0, "shape": [10, 3]}}}')
    saved = reshard.Saved(tmp_path, "model", reshard.model_split(tmp_path))
    assert saved.shape("w") == [10, 3] and torch.equal(saved.whole("w"), whole)
    for rank in range(4):  # 3, 3, 3 and 1 rows: across the first two files, then within them
        a, z = reshard.rows_of(10, 4, rank)
        assert torch.equal(saved.rows("w", 0, a, z), whole[a:z])
    assert saved.rows("w", 0, 10, 10).shape == (0, 3) and torch.equal(saved.whole("s"), torch.tensor(1.0))
    assert reshard.rows_of(3, 4, 3) == (3, 3)


# ------------------------------------------------------------------------------------------------ the plan alone
def trainer(batch_size: int, grad_accum: int, world_size: int, new_global_batch: bool = False) -> SimpleNamespace:
    stream = SimpleNamespace(streams={None: SimpleNamespace(order=object())})
    return SimpleNamespace(batch_size=batch_size, grad_accum=grad_accum, world_size=world_size, data_length=64,
                           seed=0, new_global_batch=new_global_batch, stream=stream)


META = {"batch_size": 4, "grad_accum": 1, "world_size": 4, "data_length": 64, "seed": 0}


def test_the_plan_adapts_grad_accum_or_accepts_an_explicit_split_that_keeps_the_global_batch() -> None:
    plan = resize.plan(trainer(4, 1, 2), Path("ck"), META)
    assert plan.now == resize.Split(4, 2, 2) and not plan.restart
    assert plan.message == ("resume at 2 processes from a checkpoint of 4: grad_accum 1 -> 2 keeps the global batch "
                            "of 16 (batch_size 4 x grad_accum 2 x 2 processes)")
    assert resize.plan(trainer(8, 1, 2), Path("ck"), META).now == resize.Split(8, 1, 2)  # kept by the user
    assert resize.plan(trainer(4, 1, 4), Path("ck"), META).message is None


def test_the_plan_names_settings_that_keep_the_global_batch_or_the_option_that_changes_it() -> None:
    with pytest.raises(ConfigError, match=r"do not split evenly among 3 processes: resume at 1, 2, 4, 8, 16"):
        resize.plan(trainer(4, 1, 3), Path("ck"), META)
    with pytest.raises(ConfigError, match=r"grad_accum 1 -> 3.*At 4 processes it is kept by batch_size=4 with "
                                          r"grad_accum=1"):
        resize.plan(trainer(4, 3, 4), Path("ck"), META)
    with pytest.raises(ConfigError, match=r"seed 0 -> 1"):
        resize.plan(SimpleNamespace(**{**vars(trainer(4, 1, 4)), "seed": 1}), Path("ck"), META)
    plan = resize.plan(trainer(4, 3, 4, new_global_batch=True), Path("ck"), META)
    assert plan.restart and plan.now.global_batch == 48 and "starts over" in plan.message


def test_a_stream_read_as_is_cannot_be_split_among_another_number_of_processes() -> None:
    t = trainer(4, 1, 2)
    t.stream = SimpleNamespace(streams={None: SimpleNamespace(order=None)})
    with pytest.raises(ConfigError, match=r"train_data is an iterable or DataLoader read as is.*Resume with the "
                                          r"checkpoint's world size and grad_accum \(4, 1\)"):
        resize.plan(t, Path("ck"), META)


def test_new_global_batch_starts_the_position_over_at_an_epoch_beginning() -> None:
    assert resize.restart_position({"epoch": 2, "position": 3, "end_of_epoch": 0, "draws": 5}) == \
        {"epoch": 3, "position": 0, "end_of_epoch": 0, "draws": 5}
    assert resize.restart_position({"epoch": 2, "position": 0, "end_of_epoch": 0})["epoch"] == 2
    assert resize.restart_position({"sources": {"a": {"epoch": 0, "position": 8, "end_of_epoch": 1}}}) == \
        {"sources": {"a": {"epoch": 1, "position": 0, "end_of_epoch": 0}}}


# ------------------------------------------------------------------------------------------------ one process
class Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.net(x).squeeze(1), y)


def fit(run: Path | None, steps: int, **options) -> tuple[object, dict[str, torch.Tensor]]:
    from cadence import Trainer

    torch.manual_seed(0)
    model = Regression()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=gen)
    options = {"batch_size": 4, **options}
    t = Trainer(model, (x, x.sum(1)), max_steps=steps, lr=0.01, device="cpu", progress=False, run_dir=run,
                **options)
    t.fit()
    return t, {k: v.clone() for k, v in model.state_dict().items()}


def test_a_resume_may_split_the_same_global_batch_otherwise(tmp_path: Path, capsys) -> None:
    _, reference = fit(None, 8, batch_size=8)
    fit(tmp_path / "run", 3, grad_accum=2)
    t, resumed = fit(tmp_path / "run", 8, batch_size=8, resume="auto")
    assert "resume with the same global batch of 8 (batch_size 8 x grad_accum 1 x 1 process)" in \
        capsys.readouterr().err
    assert t.step == 8
    assert_close(resumed, reference)


def test_new_global_batch_trains_on_from_the_next_epoch_and_without_it_nothing_is_written(tmp_path: Path,
                                                                                        capsys) -> None:
    run = tmp_path / "run"
    fit(run, 3)  # 3 of the 12 steps of epoch 0
    before = folder_state(run)
    with pytest.raises(ConfigError, match=r"batch_size 4 -> 8\), so the global batch would change from 4"):
        fit(run, 9, batch_size=8, resume="auto")
    assert folder_state(run) == before
    t, _ = fit(run, 9, batch_size=8, resume="auto", new_global_batch=True)  # 6 steps of 8: all of epoch 1
    assert "the global batch 4 -> 8" in capsys.readouterr().err
    assert (t.epoch, t.stream.first.position, t.stream.end_of_epoch) == (1, 6, True)


def test_a_run_resumed_at_one_process_resumes_there_again_with_the_same_arguments() -> None:
    saved = {**META, "grad_accum": 4, "world_size": 1, "grad_accum_given": 1}  # 4 processes -> 1, adapted
    plan = resize.plan(trainer(4, 1, 1), Path("ck"), saved)
    assert plan.now == resize.Split(4, 4, 1)
    assert plan.message == "resume: grad_accum 1 -> 4 keeps the global batch of 16 (batch_size 4 x grad_accum 4 x " \
                           "1 process), as before"


def test_cadence_fit_trained_on_two_processes_resumes_on_one_and_again(tmp_path: Path) -> None:
    from test_distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    common = ["--trainer.device", "cpu", "--trainer.progress", "false", "--trainer.checkpoint_every", "4",
              "--trainer.warmup_steps", "2"]

    def fit_cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "cadence", "fit", *args, *common], capture_output=True,
                              text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    fit_cli("--nproc", "2", "--master-port", str(free_port()), "--run-dir", "run", "--trainer.max_steps", "4")
    proc = fit_cli("--resume", "run", "--trainer.max_steps", "8")
    assert "resume at 1 process from a checkpoint of 2: grad_accum 1 -> 2 keeps the global batch" in proc.stderr
    assert "done: step=8" in proc.stdout
    proc = fit_cli("--resume", "run", "--trainer.max_steps", "12")
    assert "resume: grad_accum 1 -> 2 keeps the global batch" in proc.stderr and "done: step=12" in proc.stdout
