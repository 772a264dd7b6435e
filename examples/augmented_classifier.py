"""An image classifier with random augmentation in ``__getitem__`` and a per-epoch StepLR, as pytorch/examples'
MNIST script trains (here on scikit-learn's bundled 8x8 digits, so nothing is downloaded).

Each item is randomly shifted by up to one pixel and gets a little noise, drawn from torch's generator inside
``__getitem__``. cadence seeds those draws per item from ``(seed, epoch, index)`` (``item_seeding``), so the
run is the same with any ``num_workers`` and a killed run resumes bitwise. The rate is multiplied by 0.7
after every epoch (``StepLR(step_size=1, gamma=0.7)``), and a test pass runs after training.

    python examples/augmented_classifier.py --run-dir runs/digits-aug [--resume] [--epochs 4] [--workers 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cadence import Trainer


class ShiftedDigits(Dataset):
    """8x8 digits; with ``augment``, each read shifts the image by -1..1 pixels and adds noise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.augment:
            dy, dx = torch.randint(-1, 2, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2)) + 0.05 * torch.randn_like(image)
        return image, self.labels[i]


def digits(augment: bool) -> tuple[ShiftedDigits, ShiftedDigits, ShiftedDigits]:
    """Train, validation and test sets: 1,797 digits split 1,400 / 197 / 200 (a fixed permutation)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    parts = order[:1400], order[1400:1597], order[1597:]
    return tuple(ShiftedDigits(images[p], labels[p], augment and k == 0) for k, p in enumerate(parts))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.conv(image))
        return {"loss": F.cross_entropy(logits, label), "acc": (logits.argmax(1) == label).float().mean()}


def build(run_dir: str | None, epochs: int = 4, resume: bool = False, workers: int = 0, **kw) -> Trainer:
    torch.manual_seed(0)
    train, val, _ = digits(augment=True)
    return Trainer(ConvNet(), train, val_data=val, batch_size=64, max_epochs=epochs, optimizer="adam", lr=3e-3,
                   schedule="exponential", gamma=0.7, schedule_unit="epoch", num_workers=workers,
                   run_dir=run_dir, checkpoint_every=10 if run_dir else None,
                   resume="auto" if resume else None, **kw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    trainer = build(args.run_dir, args.epochs, args.resume, args.workers)
    trainer.fit()
    test = trainer.test(digits(augment=False)[2])
    print(trainer.summary(), f"test_acc={test['test/acc']:.4f}")


if __name__ == "__main__":
    main()
