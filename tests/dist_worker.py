"""A training script run under torchrun (or alone) by tests/test_distributed.py.

usage: dist_worker.py OUT_DIR [--strategy S] [--grad-accum N] [--steps N] [--checkpoint-every N] [--resume]
                              [--crash-at-step N --crash-rank R] [--nan-at-step N] [--signal-at-step N --signal-rank R]
                              [--augment] [--stream] [--unused [--find-unused]]
Writes OUT_DIR/weights-rank{R}.safetensors with the final weights of each rank (and with --stream,
OUT_DIR/items-rank{R}.txt: the items that rank's iterable yielded, one line per epoch started).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cadence import Trainer  # noqa: E402


class Model(nn.Module):
    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.spare = nn.Linear(3, 3) if unused else None  # a head no step uses (--unused)
        self.nan_at: int | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.nan_at is not None and self.training:
            self.calls += 1
            if self.calls == self.nan_at:
                loss = loss * float("nan")
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}


class Augmented(torch.utils.data.Dataset):
    """A map-style dataset whose items draw random noise (augmentation), for --augment."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(8) + random.random(), self.y[i]


class RankShare(torch.utils.data.IterableDataset):
    """A stream of this rank's share of the items (item i goes to rank i % world size), in an order shuffled
    anew each epoch, with state: for --stream. Appends each epoch's yielded items to ``log``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, log: Path) -> None:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.items = list(range(rank, len(x), world))
        self.x, self.y, self.log = x, y, log
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.pos = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.epoch)).tolist()
        with self.log.open("a") as log:
            log.write(f"\nepoch {self.epoch} from {self.pos}:")
            while self.pos < len(order):
                i = self.items[order[self.pos]]
                self.pos += 1
                log.write(f" {i}")
                log.flush()
                yield self.x[i], self.y[i]
        self.epoch, self.pos = self.epoch + 1, 0


class Fault:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def on_step_end(self, trainer: Trainer) -> None:
        rank = int(os.environ.get("RANK", 0))
        if trainer.step == self.args.crash_at_step and rank == self.args.crash_rank:
            raise RuntimeError(f"rank {rank} fails on purpose at step {trainer.step}")
        if trainer.step == self.args.signal_at_step and rank == self.args.signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--crash-at-step", type=int, default=None)
    parser.add_argument("--crash-rank", type=int, default=0)
    parser.add_argument("--signal-at-step", type=int, default=None)
    parser.add_argument("--signal-rank", type=int, default=0)
    parser.add_argument("--nan-at-step", type=int, default=None)
    parser.add_argument("--nan-rank", type=int, default=1)
    parser.add_argument("--augment", action="store_true", help="train on a map-style dataset with random noise")
    parser.add_argument("--stream", action="store_true", help="train on a stateful stream of this rank's items")
    parser.add_argument("--unused", action="store_true", help="the model has parameters no step uses")
    parser.add_argument("--find-unused", action="store_true", help="find_unused_parameters=True")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(1)
    model = Model(unused=args.unused)
    if args.nan_at_step is not None and int(os.environ.get("RANK", 0)) == args.nan_rank:
        model.nan_at = args.nan_at_step
    run_dir = out / "run" if args.checkpoint_every else None
    rank = int(os.environ.get("RANK", 0))
    train = Augmented(x, y) if args.augment else RankShare(x, y, out / f"items-rank{rank}.txt") if args.stream \
        else (x, y)
    trainer = Trainer(model, train, val_data=(x[:30], y[:30]), batch_size=args.batch_size, max_steps=args.steps,
                      grad_accum=args.grad_accum, lr=0.05, schedule="cosine", warmup_steps=2, max_grad_norm=1.0,
                      val_every=5, log_every=3, strategy=args.strategy, device="cpu", progress=False,
                      run_dir=run_dir, checkpoint_every=args.checkpoint_every,
                      resume="auto" if args.resume else None, callbacks=[Fault(args)],
                      on_nonfinite="skip" if args.nan_at_step else "raise",
                      find_unused_parameters=args.find_unused)
    trainer.fit()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / f"weights-rank{rank}.safetensors"))
    val = trainer.history.last("val")
    print(f"rank={rank} step={trainer.step} val_loss={val['loss'] if val else None} "
          f"skipped={trainer.nonfinite_total}", flush=True)


if __name__ == "__main__":
    main()
