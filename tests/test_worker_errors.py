"""``cadence fit --nproc``: an error on any rank is shown (a worker's own, not the launcher's check), once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_launch import TIMEOUT, env, free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not hasattr(signal, "SIGUSR1"),
                                reason="needs torch.distributed and POSIX signals")

DATA = '''
import os
import torch
from torch.utils.data import TensorDataset


class Picky(TensorDataset):
    """Fails on the ranks listed in `fail_on` (with the same message on each, or the rank in it)."""

    def __init__(self, fail_on: str = "1", same: bool = False):
        if os.environ.get("RANK") in str(fail_on).split(","):
            where = "" if same else f" on rank {os.environ['RANK']}"
            raise ValueError(f"the shard file is missing{where}")
        super().__init__(torch.randn(64, 64), torch.randint(0, 10, (64,)))
'''


@pytest.mark.parametrize("fail_on,same,shown", [
    ("1", False, ["rank 1: ", "the shard file is missing on rank 1"]),
    ("0,1", True, ["the shard file is missing"]),
])
def test_an_error_on_one_rank_is_shown(tmp_path: Path, fail_on: str, same: bool, shown: list[str]) -> None:
    (tmp_path / "picky.py").write_text(DATA)
    proc = subprocess.run(
        [sys.executable, "-m", "cadence", "fit", "--nproc", "2", "--master-port", str(free_port()),
         "--data", "picky.Picky", "--data.fail_on", fail_on, "--data.same", str(same).lower(),
         "--trainer.max_steps", "2", "--trainer.max_epochs", "null", "--trainer.warmup_steps", "0",
         "--trainer.valid_frac", "null", "--trainer.val_every", "null", "--trainer.device", "cpu",
         "--trainer.progress", "false", "--run-dir", "run"],
        capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("cadence: error:") == 1, proc.stderr[-3000:]
    for piece in shown:
        assert piece in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
