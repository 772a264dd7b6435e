"""What a checkpoint costs: a synchronous save and a resume against a hand-written loop's, at equal durability.

Two cases train the same kind of model one step (so the AdamW state exists) and then, alternated in one
process, repeat:

- cadence's synchronous save (``save_checkpoint()``: safetensors + JSON, checksums, fsync, atomic rename);
- cadence's async save: how long the loop stalls, and how long until the checkpoint is committed;
- cadence's resume: finding the newest checkpoint, reading and verifying it, loading it into a Trainer built
  with the same arguments (the build itself is not timed, like the hand-written model's);
- the hand-written save, bare: ``torch.save({"model": ..., "optimizer": ...})`` to one file (pickle, no
  checksum, nothing forced to disk), and at **equal durability**: the same plus ``os.fsync`` of the file and of
  its folder, which is what it takes for the file to survive a power cut, as a cadence checkpoint does;
- the hand-written resume: ``torch.load(weights_only=True)`` + ``load_state_dict`` of model and optimizer.

Cases: ``small`` is 4 x Linear(128, 128) (a checkpoint under 1 MB, where fixed costs dominate), ``large`` is
8 x Linear(1024, 1024) (a 96 MB checkpoint, where the bytes do). Medians of the repeats, with min-max.
The two resumes run in alternating order, each after ``fresh_heap()`` (the GC, then glibc's ``malloc_trim``),
so neither reuses memory the other just freed: both pay for fresh pages, as a resume in a new process does.

usage: python benchmarks/checkpoint_cost.py [--case small|large|both] [--repeats 7]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import median, rotated, spread, timed
from torch import nn

from cadence import Trainer
from cadence.checkpoint.snapshot import restore
from cadence.checkpoint.store import find_resume

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None
CASES = {"small": (128, 4), "large": (1024, 8)}
GOAL_SAVE, GOAL_RESUME = 1.5, 1.3  # issue 17: against torch.save + fsync, and torch.load(weights_only=True)


def hand_model(width: int, depth: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def make_trainer(run: Path, width: int, depth: int, background: bool, resume: bool = False) -> Trainer:
    model, _ = hand_model(width, depth)
    x = torch.randn(64, width)
    return Trainer(model, x, forward=lambda m, b: m(b).pow(2).mean(), batch_size=16, max_steps=10**6,
                   run_dir=run, overwrite=not resume, resume="auto" if resume else None, progress=False,
                   async_checkpoint=background, device="cpu")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hand_save(state: dict, path: Path, durable: bool) -> None:
    torch.save(state, path)
    if durable:  # the file's bytes, then its name in the folder
        fsync_path(path)
        fsync_path(path.parent)


def fresh_heap() -> None:
    """Free what is garbage and hand the allocator's free memory back to the OS (glibc), so that the next
    resume allocates fresh pages, as a resume in a new process does, whichever ran before it."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def cadence_resume(trainer: Trainer) -> None:
    restore(trainer, find_resume("auto", trainer.checkpoints))


def hand_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loaded = torch.load(path, weights_only=True)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


def run_case(root: Path, width: int, depth: int, repeats: int) -> tuple[float, dict[str, list[float]]]:
    times: dict[str, list[float]] = {k: [] for k in ("sync", "stall", "async", "resume", "bare", "durable",
                                                     "hand_resume")}
    sync = make_trainer(root / "sync", width, depth, background=False)
    background = make_trainer(root / "async", width, depth, background=True)
    for trainer in (sync, background):  # one real step so the optimizer state exists
        trainer.max_steps = 1
        trainer.fit()
    size_mb = sum(p.stat().st_size for p in sync.checkpoints.path(1).iterdir()) / 2**20
    (root / "hand").mkdir()
    for i in range(repeats):
        sync.step = background.step = 100 + i  # a new folder each time
        state = {"model": sync.model.state_dict(), "optimizer": sync.optimizer.state_dict()}
        hand_file = root / "hand" / f"durable-{i}.pt"
        # the synchronous saves at equal durability, in alternating order
        for which in rotated(["cadence", "hand"], i):
            if which == "cadence":
                times["sync"].append(timed(sync.save_checkpoint))
            else:
                times["durable"].append(timed(hand_save, state, hand_file, durable=True))
        t = time.perf_counter()
        background.save_checkpoint()  # returns once the state is copied into the host buffers
        times["stall"].append(time.perf_counter() - t)
        background._saver.wait()
        times["async"].append(time.perf_counter() - t)
        times["bare"].append(timed(hand_save, state, root / "hand" / f"bare-{i}.pt", durable=False))
        # the resumes: built untimed, in alternating order, each from a heap with nothing left to reuse
        for which in rotated(["cadence", "hand"], i):
            if which == "cadence":
                resumed = make_trainer(root / "sync", width, depth, background=False, resume=True)
                fresh_heap()
                times["resume"].append(timed(cadence_resume, resumed))
                assert resumed.step == sync.step
                del resumed  # a Trainer is freed by the GC: fresh_heap() collects it
            else:
                model, optimizer = hand_model(width, depth)
                fresh_heap()
                times["hand_resume"].append(timed(hand_resume, hand_file, model, optimizer))
                del model, optimizer
            fresh_heap()
    return size_mb, times


def show(ms: list[float]) -> str:
    return f"{median(ms) * 1e3:8.1f} ms  [{spread([t * 1e3 for t in ms], '{:.1f}')}]"


def report(name: str, width: int, depth: int, size_mb: float, t: dict[str, list[float]]) -> None:
    med = {k: median(v) for k, v in t.items()}
    save_ratio, resume_ratio = med["sync"] / med["durable"], med["resume"] / med["hand_resume"]
    print(f"\n{name}: {depth} x Linear({width}, {width}) + AdamW state, a {size_mb:.2f} MB checkpoint; "
          f"median [min-max] of {len(t['sync'])}")
    print(f"  cadence synchronous save         {show(t['sync'])}")
    print(f"  cadence async save, loop stall   {show(t['stall'])}  ({med['stall'] / med['sync']:.1%} of synchronous)")
    print(f"  cadence async save, to commit    {show(t['async'])}")
    print(f"  cadence resume (read+verify+load){show(t['resume'])}")
    print(f"  torch.save, bare                 {show(t['bare'])}")
    print(f"  torch.save + fsync file, folder  {show(t['durable'])}")
    print(f"  torch.load(weights_only) + load  {show(t['hand_resume'])}")
    print(f"  save:   {save_ratio:.2f}x torch.save + fsync (goal <= {GOAL_SAVE}: "
          f"{'met' if save_ratio <= GOAL_SAVE else 'missed'}); {med['sync'] / med['bare']:.2f}x bare torch.save")
    print(f"  resume: {resume_ratio:.2f}x torch.load (goal <= {GOAL_RESUME}: "
          f"{'met' if resume_ratio <= GOAL_RESUME else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=[*CASES, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torch threads 1")
    for name in CASES if args.case == "both" else [args.case]:
        width, depth = CASES[name]
        root = Path(tempfile.mkdtemp(prefix="cadence-ckpt-bench-"))
        try:
            size_mb, times = run_case(root, width, depth, args.repeats)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        report(name, width, depth, size_mb, times)


if __name__ == "__main__":
    main()
