"""What a checkpoint costs the training loop: synchronous save time per MB, the stall of an async save,
and the time to resume. One process, the same model and state for every case, alternated repeats.

The baseline is what a hand-written loop does: ``torch.save({"model": ..., "optimizer": ...})`` to one file
(pickle, no checksum, no fsync) and ``torch.load(weights_only=True)`` + ``load_state_dict`` to resume.

usage: python benchmarks/checkpoint_cost.py [--width 1024] [--depth 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cadence import Trainer


def hand_model(width: int, depth: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def make_trainer(run: Path, width: int, depth: int, background: bool, resume: bool = False) -> Trainer:
    torch.manual_seed(0)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    model = nn.Sequential(*layers)
    x = torch.randn(64, width)
    return Trainer(model, x, forward=lambda m, b: m(b).pow(2).mean(), batch_size=16, max_steps=10**6,
                   run_dir=run, overwrite=not resume, resume="auto" if resume else None, progress=False,
                   async_checkpoint=background, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="cadence-ckpt-bench-"))
    sync_t, stall_t, async_total_t, resume_t, hand_t, hand_resume_t = [], [], [], [], [], []
    try:
        sync = make_trainer(root / "sync", args.width, args.depth, background=False)
        background = make_trainer(root / "async", args.width, args.depth, background=True)
        for trainer in (sync, background):  # one real step so the optimizer state exists
            trainer.max_steps = 1
            trainer.fit()
        size_mb = sum(p.stat().st_size for p in (root / "sync" / "checkpoints").rglob("*") if p.is_file()) / 2**20
        for i in range(args.repeats):
            sync.step = background.step = 100 + i  # a new folder each time
            t = time.perf_counter()
            sync.save_checkpoint()
            sync_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            background.save_checkpoint()  # returns once the state is copied off the device
            stall_t.append(time.perf_counter() - t)
            background._saver.wait()
            async_total_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            resumed = make_trainer(root / "sync", args.width, args.depth, background=False, resume=True)
            resumed._start()
            resume_t.append(time.perf_counter() - t)
            hand_file = root / f"hand-{i}.pt"
            t = time.perf_counter()
            torch.save({"model": sync.model.state_dict(), "optimizer": sync.optimizer.state_dict()}, hand_file)
            hand_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            model, optimizer = hand_model(args.width, args.depth)
            state = torch.load(hand_file, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            hand_resume_t.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print(f"torch {torch.__version__}, threads 1, checkpoint {size_mb:.1f} MB "
          f"({args.depth} x Linear({args.width}, {args.width}) + AdamW state)")
    print(f"synchronous save      {med(sync_t) * 1e3:8.1f} ms  ({med(sync_t) / size_mb * 1e3:.2f} ms/MB)")
    print(f"async save, loop stall {med(stall_t) * 1e3:7.1f} ms  ({med(stall_t) / med(sync_t):.1%} of synchronous)")
    print(f"async save, to commit {med(async_total_t) * 1e3:8.1f} ms")
    print(f"resume (build + load) {med(resume_t) * 1e3:8.1f} ms")
    print(f"hand-written torch.save {med(hand_t) * 1e3:6.1f} ms  (cadence's synchronous save: "
          f"{med(sync_t) / med(hand_t):.2f}x; its async stall: {med(stall_t) / med(hand_t):.1%} of it)")
    print(f"hand-written resume   {med(hand_resume_t) * 1e3:8.1f} ms  (build + torch.load(weights_only=True) + "
          f"load_state_dict; cadence's resume: {med(resume_t) / med(hand_resume_t):.2f}x)")


if __name__ == "__main__":
    main()
