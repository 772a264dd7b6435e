"""What the benchmarks share: the two models (written so that ``torch.compile`` takes each whole), their data,
the data order contract's batches for hand-written loops, and summaries of repeated timings.

The models are those of ``peers.py`` (same layers, same initialization order, so the same initial weights from
the same seed) without its per-forward time stamps, which would break a compiled graph.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0


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


def make_data(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` items: MLP features with learnable classes, or random token sequences shifted by one."""
    g = torch.Generator().manual_seed(SEED + 1)
    if name == "mlp":
        x = torch.randn(n, 32, generator=g)
        return x, (x @ torch.randn(32, 10, generator=g) + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    tokens = torch.randint(0, 256, (n, 65), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def contract_batches(data: tuple[torch.Tensor, torch.Tensor], batch: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless batches in the data order contract: epoch ``e`` slices ``randperm(N, seed + e)`` (cadence's order)."""
    x, y = data
    epoch = 0
    while True:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED + epoch))
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            yield x[idx], y[idx]
        epoch += 1


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``min-max`` of repeated measurements, for the tables."""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """One line: CPU count, Python and torch versions, threads."""
    import os

    return (f"{platform.machine()}, os.cpu_count()={os.cpu_count()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
