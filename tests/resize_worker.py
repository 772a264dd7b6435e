"""A training script run under torchrun (or alone) by tests/test_resize.py: train, then resume at another
number of processes.

usage: resize_worker.py OUT RUN [--strategy S] [--grad-accum N] [--batch-size N] [--steps N]
                                [--resume] [--new-global-batch] [--ema]
Trains on a counting dataset with augmentation (item i is x[i] plus noise drawn in __getitem__, and i itself)
in the run folder RUN, for --steps steps (the schedule's length is fixed: a shorter run is the first part of
a longer one). Every rank appends the items of each of its micro-batches to OUT/items-rankR.txt (one
line each) and writes its final weights to OUT/weights-rankR.safetensors (with --ema, the EMA's to
OUT/ema-rankR.safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cadence import EMA, Trainer  # noqa: E402


class Counting(torch.utils.data.Dataset):
    """Item i: features with noise drawn here (augmentation), its label, and i (to count what is trained)."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i] + 0.1 * torch.randn(8), self.y[i], i


class Model(nn.Module):
    def __init__(self, log: Path) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.log = log

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with self.log.open("a") as f:
            f.write(" ".join(str(int(i)) for i in index) + "\n")
        return nn.functional.cross_entropy(self.net(x), y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("run")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--new-global-batch", action="store_true")
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the weights (DDP or one process)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(1)
    model = Model(out / f"items-rank{rank}.txt")
    trainer = Trainer(model, Counting(args.items), batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_steps=args.steps, lr=0.05, schedule="cosine", decay_steps=8,
                      warmup_steps=2, max_grad_norm=1.0,
                      log_every=3, strategy=args.strategy, device="cpu", progress=False, run_dir=args.run,
                      resume="auto" if args.resume else None, new_global_batch=args.new_global_batch,
                      ema=EMA(beta=0.9) if args.ema else None)
    trainer.fit()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / f"weights-rank{rank}.safetensors"))
    if trainer.ema is not None:
        save_file({k: v.contiguous() for k, v in trainer.ema.model.state_dict().items()},
                  str(out / f"ema-rank{rank}.safetensors"))
    print(f"rank={rank} step={trainer.step} grad_accum={trainer.grad_accum}", flush=True)


if __name__ == "__main__":
    main()
