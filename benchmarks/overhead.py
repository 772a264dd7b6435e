"""Per-step overhead of cadence against hand-written PyTorch loops (issue 3).

Four cases train the same model (an MLP 32 -> 32 -> 32 -> 10, ReLU, cross-entropy) from the same initial
weights on the same data, in the same order, for the same number of steps (batch 64, AdamW lr 1e-3 without
weight decay, gradient clipping at norm 1.0, fp32, CPU, one thread):

  a  hand-written DataLoader loop: ``DataLoader(TensorDataset(X, y), batch_size=64, sampler=RandomSampler)``
     (exactly what ``shuffle=True`` builds; the sampler is passed explicitly only so that its generator can
     be re-seeded each epoch to follow the data order contract), cycling over epochs;
  b  hand-written in-memory loop: ``X[idx], y[idx]`` for consecutive 64-slices ``idx`` of each epoch's
     ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch))`` (the data order contract);
  c  cadence on a map-style ``Dataset`` (not a ``TensorDataset``): cadence's map-style path, item by item
     with its defaults (``item_seeding=True``, ``num_workers=0``: read and collated without a DataLoader);
  d  cadence on the tensors ``(X, y)``: cadence's in-memory fast path.

What is timed: the training loop only. For the hand-written loops, the model copy, the optimizer and the
DataLoader are built before the clock starts; for cadence, ``Trainer(...)`` is built before the clock starts
and only ``fit()`` is timed (its construction time is printed separately). The hand-written loops read the
loss with ``.item()`` every ``log_every`` steps, as cadence does at its log points.

The cases run round-robin inside one process (repeat ``r`` starts at case ``r mod 4`` so no case always runs
first), after one untimed warm-up run of each. The figures are medians over the repeats; ratios are ratios of
medians. As a check that every case did the same work, the final weights of all cases are compared bitwise.

On a shared or busy machine wall-clock times swing with the other processes. ``--instructions`` counts
instead the CPU instructions each case executes per step, under valgrind's callgrind (``apt-get install
valgrind``): deterministic and blind to other processes, though not a time (it ignores cache misses and
instruction costs). It runs each case once for 256 steps and takes about 15 minutes.

    .venv/bin/python benchmarks/overhead.py                 # full: 3000 steps, 5 repeats
    .venv/bin/python benchmarks/overhead.py --quick         # smoke run: 300 steps, 2 repeats
    .venv/bin/python benchmarks/overhead.py --instructions  # instructions per step (valgrind)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import MLP, ItemDataset, callgrind, clock, cpu_name, epoch_perm, make_data, rotated, since
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from cadence import Trainer

N_ITEMS, FEATURES, WIDTH, CLASSES = 8192, 32, 32, 10
BATCH, LR, MAX_NORM, LOG_EVERY = 64, 1e-3, 1.0, 500

GOAL_LOADER = 1.03  # (c) / (a) must be at most this
GOAL_IN_MEMORY = 0.7  # (d) / (a) must be below this


# ------------------------------------------------------------------------------------------------ cases
# Each case takes (model, X, y, steps, seed), builds what it needs, and returns a function that trains and
# returns (wall seconds, this thread's CPU seconds) of the timed part.
Times = tuple[float, float]
Case = Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], Callable[[], Times]]


def hand_loader(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> Callable[[], Times]:
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    data = TensorDataset(x, y)
    perm_gen = torch.Generator()
    loader = DataLoader(data, batch_size=BATCH, sampler=RandomSampler(data, generator=perm_gen))

    def run() -> Times:
        model.train()
        losses = []
        step = epoch = 0
        start = clock()
        while step < steps:
            perm_gen.manual_seed(seed + epoch)  # the contract's order: randperm(N, seed + epoch)
            for xb, yb in loader:
                loss = model(xb, yb)
                loss.backward()
                nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step % LOG_EVERY == 0:
                    losses.append(loss.item())
                if step == steps:
                    break
            epoch += 1
        return since(start)

    return run


def hand_in_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int
                   ) -> Callable[[], Times]:
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    n = len(x)

    def run() -> Times:
        model.train()
        losses = []
        step = epoch = 0
        start = clock()
        while step < steps:
            perm = epoch_perm(n, epoch, seed)
            for i in range(0, n, BATCH):
                idx = perm[i:i + BATCH]
                loss = model(x[idx], y[idx])
                loss.backward()
                nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step % LOG_EVERY == 0:
                    losses.append(loss.item())
                if step == steps:
                    break
            epoch += 1
        return since(start)

    return run


CONSTRUCTION_S: dict[str, list[float]] = {}


def _cadence(key: str, make_data_arg: Callable[[torch.Tensor, torch.Tensor], object]) -> Case:
    def case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> Callable[[], Times]:
        t0 = time.perf_counter()
        trainer = Trainer(model, make_data_arg(x, y), batch_size=BATCH, max_steps=steps, optimizer="adamw",
                          lr=LR, max_grad_norm=MAX_NORM, log_every=LOG_EVERY, progress=False, device="cpu",
                          seed=seed)
        CONSTRUCTION_S.setdefault(key, []).append(time.perf_counter() - t0)

        def run() -> Times:
            start = clock()
            trainer.fit()
            elapsed = since(start)
            assert trainer.step == steps, (trainer.step, steps)
            return elapsed

        return run

    return case


CASES: dict[str, tuple[str, Case]] = {
    "a": ("hand-written DataLoader loop", hand_loader),
    "b": ("hand-written in-memory loop", hand_in_memory),
    "c": ("cadence, map-style Dataset", _cadence("c", lambda x, y: ItemDataset(x, y))),
    "d": ("cadence, in-memory (X, y)", _cadence("d", lambda x, y: (x, y))),
}


def check_paths(x: torch.Tensor, y: torch.Tensor) -> str:
    """Which data path cadence takes for (c) and (d); 'unknown' if cadence's internals have moved."""
    try:
        from cadence.data.loading import as_in_memory, is_map_style
    except ImportError:
        return "unknown (cadence.data.loading.as_in_memory not found)"
    c_loader = as_in_memory(ItemDataset(x, y)) is None and is_map_style(ItemDataset(x, y))
    d_memory = as_in_memory((x, y)) is not None
    if not (c_loader and d_memory):
        raise SystemExit(f"case (c) must take cadence's map-style path ({c_loader}) and (d) its in-memory "
                         f"path ({d_memory}); fix the benchmark's datasets.")
    return "(c) map-style Dataset path (item by item, item_seeding=True), (d) in-memory path"


# ------------------------------------------------------------------------------------------------ running
def machine() -> list[str]:
    cpu = cpu_name()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"date:     {datetime.date.today().isoformat()}",
        f"python:   {platform.python_version()} ({sys.executable})",
        f"torch:    {torch.__version__}, threads={torch.get_num_threads()}",
        f"platform: {platform.platform()}",
        f"cpu:      {cpu}; os.cpu_count()={os.cpu_count()}, usable={usable}",
    ]


def run_case(key: str, init: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int
             ) -> tuple[Times, list[torch.Tensor]]:
    model = copy.deepcopy(init)
    run = CASES[key][1](model, x, y, steps, seed)
    elapsed = run()
    return elapsed, [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------------ instructions
MARK = os.getppid  # callgrind dumps its counters each time libc's getppid is entered: a marker around each run
INSTRUCTION_STEPS = 256  # two epochs of 128 steps


def marked_runs(seed: int) -> None:
    """Under callgrind: each case once, its fit/loop alone between two markers (warm-up runs first)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x, y = make_data("mlp", N_ITEMS, seed)
    init = MLP()
    for key in CASES:  # untimed: valgrind translates the code the first time it runs
        run_case(key, init, x, y, 130, seed)
    for key in CASES:
        run = CASES[key][1](copy.deepcopy(init), x, y, INSTRUCTION_STEPS, seed)
        MARK()
        run()
        MARK()


def count_instructions(seed: int) -> int:
    keys = list(CASES)
    print(f"counting instructions: each case once for {INSTRUCTION_STEPS} steps under callgrind (about 15 minutes)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="cadence-cg-") as tmp:
        code, output, dumps = callgrind([sys.executable, __file__, "--_marked-runs", "--seed", str(seed)], "getppid",
                                        Path(tmp) / "cg.out")
    if code != 0:
        raise SystemExit(f"valgrind failed ({code}):\n{output[-3000:]}")
    if len(dumps) != 2 * len(keys):  # one per marker: (before, run) per case; the rest goes to cg.out
        raise SystemExit(f"expected {2 * len(keys)} callgrind dumps, found {len(dumps)}")
    counts = {key: dumps[2 * i + 1] / INSTRUCTION_STEPS for i, key in enumerate(keys)}
    print()
    print("| case | instructions per step | vs (a) | vs (b) |")
    print("|---|---:|---:|---:|")
    for key in keys:
        print(f"| ({key}) {CASES[key][0]} | {counts[key] / 1e3:,.0f} k | {counts[key] / counts['a']:.3f}x | "
              f"{counts[key] / counts['b']:.3f}x |")
    print()
    ca, da = counts["c"] / counts["a"], counts["d"] / counts["a"]
    print(f"(c)/(a) {ca:.3f}x (goal <= {GOAL_LOADER}: {verdict(ca <= GOAL_LOADER)}), "
          f"{(counts['c'] - counts['a']) / 1e3:+,.0f} k instructions per step")
    print(f"(d)/(a) {da:.3f}x (goal <  {GOAL_IN_MEMORY}: {verdict(da < GOAL_IN_MEMORY)})")
    print(f"(d)/(b) {counts['d'] / counts['b']:.3f}x, "
          f"{(counts['d'] - counts['b']) / 1e3:+,.0f} k instructions per step")
    return 0


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (default 3000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each case (default 5)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 steps, 2 repeats")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per step under valgrind instead of timing (deterministic, slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_marked-runs", dest="marked_runs", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.marked_runs:
        marked_runs(args.seed)
        return 0
    steps, repeats = (300, 2) if args.quick else (args.steps, args.repeats)
    if args.instructions:
        steps, repeats = INSTRUCTION_STEPS, 1

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x, y = make_data("mlp", N_ITEMS, args.seed)
    init = MLP()
    keys = list(CASES)

    print("cadence per-step overhead benchmark (issue 3)")
    for line in machine():
        print("  " + line)
    print(f"  setup:    MLP {FEATURES}->{WIDTH}->{WIDTH}->{CLASSES}, N={N_ITEMS}, batch={BATCH}, AdamW lr={LR}, "
          f"clip={MAX_NORM}, log_every={LOG_EVERY}, steps={steps}, repeats={repeats}")
    print(f"  paths:    {check_paths(x, y)}")
    print(f"  command:  {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(flush=True)
    if args.instructions:
        return count_instructions(args.seed)

    warm = min(steps, 300)
    for key in keys:  # untimed warm-up: allocator, caches, lazy imports
        run_case(key, init, x, y, warm, args.seed)
    CONSTRUCTION_S.clear()

    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    same_weights = True
    for r in range(repeats):
        order = rotated(keys, r)
        finals = {}
        for key in order:
            (w, c), finals[key] = run_case(key, init, x, y, steps, args.seed)
            wall[key].append(w)
            cpu[key].append(c)
        same_weights &= all(all(torch.equal(p, q) for p, q in zip(finals["a"], finals[k])) for k in keys)
        print(f"  repeat {r + 1}/{repeats} (wall s): " + "  ".join(f"{k}={wall[k][-1]:.3f}" for k in keys),
              flush=True)

    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print()
    print("| case | median s | min s | max s | steps/s | us/step | vs (a) | vs (a), CPU time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in keys:
        t = wall[key]
        print(f"| ({key}) {CASES[key][0]} | {med[key]:.3f} | {min(t):.3f} | {max(t):.3f} | {steps / med[key]:.0f} | "
              f"{med[key] / steps * 1e6:.0f} | {med[key] / med['a']:.3f}x | {cmed[key] / cmed['a']:.3f}x |")
    print()
    ca, da, db = med["c"] / med["a"], med["d"] / med["a"], med["d"] / med["b"]
    per_step = {k: (med[k] - med[base]) / steps * 1e6 for k, base in (("c", "a"), ("d", "b"))}
    print("ratios of medians (wall clock; CPU time of this thread in brackets):")
    print(f"  (c)/(a) cadence map-style Dataset / hand DataLoader loop: {ca:.3f}x [{cmed['c'] / cmed['a']:.3f}x]  "
          f"goal <= {GOAL_LOADER}: {verdict(ca <= GOAL_LOADER)}  ({per_step['c']:+.0f} us/step)")
    print(f"  (d)/(a) cadence in-memory / hand DataLoader loop:       {da:.3f}x [{cmed['d'] / cmed['a']:.3f}x]  "
          f"goal <  {GOAL_IN_MEMORY}: {verdict(da < GOAL_IN_MEMORY)}")
    print(f"  (d)/(b) cadence in-memory / hand in-memory loop:        {db:.3f}x [{cmed['d'] / cmed['b']:.3f}x]  "
          f"({per_step['d']:+.0f} us/step)")
    print(f"  (b)/(a) hand in-memory / hand DataLoader loop:          {med['b'] / med['a']:.3f}x "
          f"[{cmed['b'] / cmed['a']:.3f}x]  (the floor for (d)/(a) at the hand loop's optimizer speed)")
    best = {k: min(v) for k, v in wall.items()}
    paired = {k: statistics.median(w / a for w, a in zip(wall[k], wall["a"])) for k in keys}
    print("the same ratios from the fastest run of each case (least disturbed by other processes), and as the "
          "median of each repeat's own ratio:")
    print("  " + "  ".join(f"({k})/(a) {best[k] / best['a']:.3f}x, {paired[k]:.3f}x;" for k in "bcd")
          + f"  (d)/(b) {best['d'] / best['b']:.3f}x")
    build = {k: statistics.median(v) * 1e3 for k, v in CONSTRUCTION_S.items()}
    print("Trainer construction (outside the timed part), median ms: "
          + ", ".join(f"({k}) {v:.2f}" for k, v in build.items()))
    print(f"final weights bitwise equal across all four cases: {'yes' if same_weights else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
