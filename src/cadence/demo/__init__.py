"""The built-in demo: scikit-learn's bundled 8x8 handwritten digits and a small MLP (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

CONFIG = Path(__file__).with_name("digits.yaml")


class Digits(TensorDataset):
    """1,797 images of 8x8 digits as ``(pixels, label)``: pixels scaled to [0, 1], flattened to 64 values.

    ``n`` keeps only the first ``n`` images (a quick try: ``--data.n 200``); None keeps them all.
    """

    def __init__(self, n: int | None = None) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - the demo extra installs it
            raise ImportError('the digits demo needs scikit-learn: pip install "cadence[demo]"') from err
        digits = load_digits()
        pixels = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        if n is not None and not 1 <= n <= len(labels):
            raise ValueError(f"n={n!r}: there are {len(labels)} digits; give 1..{len(labels)}, or None for all.")
        super().__init__(pixels[:n], labels[:n])


class DigitsMLP(nn.Module):
    """An MLP classifier that returns its loss and, as a part, its accuracy."""

    def __init__(self, hidden: int = 128, dropout: float = 0.1, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixels)
        loss = nn.functional.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "acc": acc}
