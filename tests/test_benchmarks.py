"""The GPU benchmark's two loops, run small on the CPU: they must train the same weights, bit for bit.

``benchmarks/gpu.py`` only runs where a GPU is lent; this keeps its loops honest in between (the same data
order, bf16 autocast, weight-decay groups, clipping) and checks the script still runs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_benchmark_loops_match_bitwise_on_the_cpu():
    c = gpu.Config(layers=2, width=32, heads=4, seq=16, vocab=64, batch=4, sequences=24)
    args = argparse.Namespace(compile=False, steps=5, warmup=2, log_every=3, lr=3e-3)
    torch.manual_seed(0)
    init = gpu.GPT(c)
    tokens = torch.randint(0, c.vocab, (c.sequences, c.seq + 1), generator=torch.Generator().manual_seed(1))
    device, times = torch.device("cpu"), []
    hand = gpu.hand_run(copy.deepcopy(init), tokens, c, args, device, times)
    ours = gpu.cadence_run(copy.deepcopy(init), tokens, c, args, device, times)
    assert len(times) == 2
    changed = [not torch.equal(a, b) for a, b in zip(init.parameters(), hand.parameters())]
    assert all(changed)
    for (name, a), b in zip(hand.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name


def test_gpu_benchmark_smoke_run_prints_its_table(capsys):
    assert gpu.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| cadence |" in out and "max abs difference cadence vs hand: 0 " in out


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_the_built_in_compiled_loop(capsys):
    """compile="max" on the GPU model, run small on the CPU (compiling: slow)."""
    assert gpu.main(["--smoke", "--smoke-max"]) == 0
    out = capsys.readouterr().out
    assert "| max |" in out and "max abs difference compile='max' vs hand" in out


@pytest.mark.slow
def test_compiled_benchmark_quick_run_prints_its_table(capsys):
    import compiled

    assert compiled.main(["--quick", "--cases", "mlp", "--loops", "hand,hand-compiled,compile,fused"]) == 0
    out = capsys.readouterr().out
    for loop in ("hand", "hand-compiled", "compile", "fused"):
        assert f"| {loop} |" in out
    assert "| hand | " in out and "bitwise |" in out  # the eager hand loop is its own reference
