"""What the benchmarks share: the two models (written so that ``torch.compile`` takes each whole), their data,
the data order contract's batches for hand-written loops, clocks and summaries of repeated timings, the machine
description, import timing in fresh interpreters, and instruction counting under valgrind's callgrind.

The models are those of ``peers.py`` (same layers, same initialization order, so the same initial weights from
the same seed) without its per-forward time stamps, which would break a compiled graph.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

SEED = 0


class ItemDataset(Dataset):
    """A plain map-style dataset: item by item, as ``TensorDataset`` does, but not one (so cadence takes no fast
    path and every loop reads and collates item by item)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)  # the same body as TensorDataset.__getitem__

    def __len__(self) -> int:
        return len(self.tensors[0])


class MLP(nn.Module):
    """32 -> 32 -> 32 -> 10, ReLU, cross-entropy: the tiny model of the per-step overhead cases."""

    def __init__(self, features: int = 32, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, classes))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


class TinyLM(nn.Module):
    """A causal pre-norm transformer language model (2 layers, width 64, 4 heads, sequence 64, vocabulary 256)."""

    def __init__(self, vocab: int = 256, d_model: int = 64, heads: int = 4, layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.blocks(self.emb(tokens) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True)
        return F.cross_entropy(self.head(self.norm(h)).flatten(0, 1), targets.flatten())


def build(name: str) -> nn.Module:
    """A fresh model with the seeded initial weights."""
    torch.manual_seed(SEED)
    return MLP() if name == "mlp" else TinyLM()


def make_data(name: str, n: int, seed: int = SEED + 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` items: MLP features with learnable classes, or random token sequences shifted by one."""
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        x = torch.randn(n, 32, generator=g)
        return x, (x @ torch.randn(32, 10, generator=g) + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    tokens = torch.randint(0, 256, (n, 65), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def epoch_perm(n: int, epoch: int, seed: int = SEED) -> torch.Tensor:
    """The data order contract: epoch ``e`` visits ``randperm(n)`` drawn from a generator seeded ``seed + e``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def contract_batches(data: tuple[torch.Tensor, torch.Tensor], batch: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless batches in the data order contract: epoch ``e`` slices ``randperm(N, seed + e)`` (cadence's order)."""
    x, y = data
    epoch = 0
    while True:
        perm = epoch_perm(len(x), epoch)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            yield x[idx], y[idx]
        epoch += 1


T = TypeVar("T")


def rotated(items: Sequence[T], r: int) -> list[T]:
    """``items`` starting at ``r mod len``: the order of repeat ``r``, so that no case always runs first."""
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def clock() -> tuple[float, float]:
    """Wall time and this thread's CPU time (``time.thread_time``, less moved by other processes)."""
    return time.perf_counter(), time.thread_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and thread CPU seconds since ``start`` (a ``clock()`` reading)."""
    return time.perf_counter() - start[0], time.thread_time() - start[1]


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``min-max`` of repeated measurements, for the tables."""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else ``platform.processor()`` or ``?``."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine() -> str:
    """One line: CPU count, Python and torch versions, threads."""
    return (f"{platform.machine()}, os.cpu_count()={os.cpu_count()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def timed_import(code: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``code`` in a fresh interpreter."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# Instructions executed, counted by valgrind's callgrind: unlike time, they do not depend on what else the machine
# runs. The measured process calls a libc function that nothing else calls (the "marker") before and after each
# run; ``--dump-before=MARKER`` makes callgrind write its counters to a new file ``OUT.<n>`` at each call.
def callgrind(argv: list[str], marker: str, out: Path) -> tuple[int, str, list[int]]:
    """Runs ``argv`` under callgrind; returns its exit status, its output (stdout and stderr) and the instruction
    count of each dump, in order."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("counting instructions needs valgrind (apt-get install valgrind).")
    done = subprocess.run([valgrind, "--tool=callgrind", f"--dump-before={marker}", f"--callgrind-out-file={out}",
                           *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dumps = sorted(out.parent.glob(f"{out.name}.*"), key=lambda f: int(f.suffix[1:]))
    return done.returncode, done.stdout, [dump_instructions(f.read_text()) for f in dumps]


def dump_instructions(text: str) -> int:
    """The instructions of one callgrind dump: its ``summary:`` line (the same figure as its ``totals:`` line)."""
    for line in text.splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError("no 'summary:' line in the callgrind dump")
