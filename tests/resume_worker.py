"""One training run for the resume tests, importable (``build``) and runnable as a killable subprocess.

    python tests/resume_worker.py RUN_DIR [--resume] [--max-steps N] [--checkpoint-every K] [--sleep S]

The run has everything exact resume must carry: dropout and batch norm (RNG and buffers), shuffling,
``grad_accum=2`` with a short last step per epoch, a cosine schedule with warm-up and gradient clipping.
It prints ``started`` when training begins and ``step N`` after every optimizer step (flushed), so a test
can kill it at a chosen moment; on SIGTERM/SIGINT cadence saves and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cadence import Trainer  # noqa: E402
from helpers import make_data  # noqa: E402

N_ITEMS = 52  # batch 4 x grad_accum 2: 6 full steps and one of 4 items per epoch (7 steps)


class DropoutNet(nn.Module):
    """8 -> width (batch norm, dropout) -> 2; ``extra_layer`` adds a width -> width layer."""

    def __init__(self, width: int = 16, extra_layer: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.25)]
        if extra_layer:
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


class Items(Dataset):
    """A map-style dataset with a deterministic ``__getitem__`` (usable by DataLoader workers)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] * 1.0, self.y[i]


def settings(**overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(batch_size=4, grad_accum=2, max_steps=30, lr=0.05, warmup_steps=4, schedule="cosine",
                              min_lr=1e-3, max_grad_norm=0.5, shuffle=True, seed=3, log_every=2, device="cpu",
                              progress=False)
    kw.update(overrides)
    return kw


def build(run_dir: Path | str | None, data: Any = None, model: nn.Module | None = None, **overrides: Any) -> Trainer:
    """The run's Trainer (a fresh ``DropoutNet`` and 52 items unless given)."""
    return Trainer(model if model is not None else DropoutNet(),
                   data if data is not None else make_data(N_ITEMS, seed=1),
                   run_dir=run_dir, **settings(**overrides))


class CrashAt:
    """Raises at the end of step ``step``: a crash after that step's update, before its checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.step:
            raise RuntimeError(f"simulated crash at step {trainer.step}")


class StartedAt:
    """Records the step each ``fit()`` starts from (after a resume: the checkpoint's step)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.steps.append(trainer.step)


class Pace:
    """Prints progress (flushed) and sleeps a little after each step, so that kills land at chosen points."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_fit_start(self, trainer: Trainer) -> None:
        print(f"started {trainer.step}", flush=True)

    def on_step_end(self, trainer: Trainer) -> None:
        print(f"step {trainer.step}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tests' in-process reference runs use one thread too: same arithmetic
    trainer = build(args.run_dir, resume="auto" if args.resume else None, max_steps=args.max_steps,
                    checkpoint_every=args.checkpoint_every, callbacks=[Pace(args.sleep)])
    trainer.fit()
    print(f"done {trainer.step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
