"""The cost of per-item seeding (``item_seeding=True``, the default) on cadence's map-style ``Dataset`` path
(issue 22), before and after seeding became lazy.

*Before* is the eager method cadence used until issue 22, kept here as ``EagerSeededItems``: seed ``random``,
numpy and torch before every item, and in the main process save the three generators before a micro-batch and
put them back after it. *After* is ``cadence.data.seeding.SeededItems``: it seeds only the generators the
dataset has been seen to draw from (data/seeding.py).

Two parts:

1. ``--part items``: the time to read one item through each wrapper against reading it plainly, per item and
   per micro-batch, in the main process and as a worker does it, for a dataset that draws nothing and for one
   that draws from torch.
2. ``--part steps``: whole training runs, the CPU time per step of this thread (one thread, ``num_workers=0``),
   of a hand-written ``DataLoader`` loop against cadence's defaults (after) and cadence with the eager
   wrapper patched in (before), on three cases: ``mlp`` (32 -> 32 -> 32 -> 10, 32 floats an item), ``conv``
   (1x28x28 -> 8 channels -> linear) and ``wide`` (4096 floats an item -> 32 -> 10). Every loop gets the same
   ``Dataset`` object, the same order (the data order contract), the same initial weights; batch 64, AdamW,
   clipping at 1.0. The cases alternate in one process, the first rotating per repeat; medians. With
   ``--workers 2`` the loops read with two worker processes (the hand-written loop's ``persistent_workers=True``)
   and the figure is items per second of wall clock from the 10th step's forward to the last one's, leaving out
   the workers' start-up and shut-down (which cadence does inside ``fit()``).

    .venv/bin/python benchmarks/item_seeding.py --part items [--items 20000] [--batch 32] [--repeats 5]
    .venv/bin/python benchmarks/item_seeding.py --part steps [--steps 600] [--repeats 5] [--workers 0]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import MLP, ItemDataset, make_data, median, rotated, spread
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, get_worker_info

import cadence.data.loading
from cadence import Trainer
from cadence.data import seeding

BATCH, LR, MAX_NORM = 64, 1e-3, 1.0
SKIP = 10  # with workers, items/s are measured from this step's forward on


class EagerSeededItems(seeding.SeededItems):
    """cadence's per-item seeding before issue 22: all three generators seeded before every item, and (in the main
    process) all three saved and put back around every micro-batch."""

    def _read(self, epoch: int, indices: Sequence[int], put_back: bool) -> list[Any]:
        saved = (random.getstate(), np.random.get_state(), torch.default_generator.get_state()) if put_back else None
        items = []
        for i in indices:
            seeding.seed_generators(seeding.item_seed(self.seed, epoch, i))
            items.append(self.data[i])
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])
        return items


class Noisy(ItemDataset):
    """An augmenting dataset: torch noise on every item."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tensors
        return x[i] + 0.01 * torch.randn(x.shape[1:]), y[i]


# ------------------------------------------------------------------------------------------------ part 1
def per_item_us(read: Callable[[Any], Any], n: int, batch: int) -> float:
    start = time.perf_counter()
    for b in range(0, n, batch):
        read((0, b // batch, list(range(b, min(b + batch, n)))))
    return (time.perf_counter() - start) / n * 1e6


def part_items(args: argparse.Namespace) -> None:
    x, y = make_data("mlp", args.items)
    rows: dict[str, list[float]] = {}
    for data in (ItemDataset(x, y), Noisy(x, y)):
        kind = type(data).__name__
        plain = lambda key, data=data: [data[i] for i in key[2]]  # noqa: E731
        cases = {f"{kind}: plain __getitem__": plain}
        for label, wrapper in (("before (eager)", EagerSeededItems), ("after (lazy)", seeding.SeededItems)):
            cases[f"{kind}: {label}, main process"] = wrapper(data, 0, True).__getitems__
            cases[f"{kind}: {label}, in a worker"] = wrapper(data, 0, True).__getitems__
        for r in range(args.repeats):
            for name in rotated(list(cases), r):
                worker = name.endswith("in a worker")
                if worker:  # as in a worker: the generators are not put back, collate's draws are seeded
                    seeding.get_worker_info = lambda: object()
                try:
                    rows.setdefault(name, []).append(per_item_us(cases[name], args.items, args.batch))
                finally:
                    seeding.get_worker_info = get_worker_info
    print(f"{args.items} items of 32 floats, micro-batches of {args.batch}, median of {args.repeats} (min-max):")
    print()
    print("| read | us per item | over plain, per item | over plain, per micro-batch |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in rows.items():
        base = median(rows[name.split(":")[0] + ": plain __getitem__"])
        med = median(values)
        print(f"| {name} | {med:.2f} ({spread(values, '{:.2f}')}) | {med - base:+.2f} | "
              f"{(med - base) * args.batch:+.0f} |")


# ------------------------------------------------------------------------------------------------ part 2
class Conv(nn.Module):
    """1x28x28 -> 3x3 conv, 8 channels, ReLU -> linear to 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 28 * 28, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(F.relu(self.conv(x)).flatten(1)), y)


class Wide(nn.Module):
    """4096 features -> 32 -> 10: items of 16 KiB."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4096, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def make_case(name: str) -> tuple[nn.Module, ItemDataset]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return MLP(), ItemDataset(*make_data("mlp", 8192))
    if name == "conv":
        x = torch.randn(4096, 1, 28, 28, generator=g)
        return Conv(), ItemDataset(x, torch.randint(0, 10, (4096,), generator=g))
    return Wide(), ItemDataset(torch.randn(2048, 4096, generator=g), torch.randint(0, 10, (2048,), generator=g))


def hand_loop(model: nn.Module, data: ItemDataset, steps: int, workers: int) -> Callable[[], float]:
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    perm_gen = torch.Generator()
    loader = DataLoader(data, batch_size=BATCH, sampler=RandomSampler(data, generator=perm_gen),
                        num_workers=workers, persistent_workers=workers > 0)

    def run() -> None:
        model.train()
        step = epoch = 0
        while step < steps:
            perm_gen.manual_seed(epoch)  # the contract's order: randperm(N, seed + epoch), seed 0
            for xb, yb in loader:
                loss = model(xb, yb)
                loss.backward()
                nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step == steps:
                    break
            epoch += 1
        loss.item()

    return run


Loop = Callable[[nn.Module, ItemDataset, int, int], Callable[[], None]]


def cadence_loop(wrapper: type, item_seeding: bool = True) -> Loop:
    def build(model: nn.Module, data: ItemDataset, steps: int, workers: int) -> Callable[[], None]:
        def run() -> None:
            cadence.data.loading.SeededItems = wrapper  # the wrapper the data path is built with
            try:
                Trainer(model, data, batch_size=BATCH, max_steps=steps, optimizer="adamw", lr=LR,
                        max_grad_norm=MAX_NORM, log_every=steps, progress=False, device="cpu", seed=0,
                        num_workers=workers, item_seeding=item_seeding).fit()
            finally:
                cadence.data.loading.SeededItems = seeding.SeededItems

        return run

    return build


LOOPS = {"hand": ("hand-written DataLoader loop", hand_loop),
         "before": ("cadence defaults, eager seeding (before)", cadence_loop(EagerSeededItems)),
         "after": ("cadence defaults (after)", cadence_loop(seeding.SeededItems)),
         "off": ("cadence, item_seeding=False", cadence_loop(seeding.SeededItems, item_seeding=False))}


def part_steps(args: argparse.Namespace) -> None:
    workers = args.workers
    measure = (f"items/s of wall clock from step {SKIP} to the last (start-up and shut-down of the workers left "
               "out)" if workers else "us/step (CPU time of this thread)")
    print(f"num_workers={workers}, {args.steps} steps, batch {BATCH}, median of {args.repeats}; {measure}")
    print()
    print("| case | " + " | ".join(LOOPS[k][0] for k in LOOPS) + " | before / hand | after / hand | off / hand |")
    print("| --- |" + " ---: |" * (len(LOOPS) + 3))
    for case in args.cases:
        init, data = make_case(case)
        times: dict[str, list[float]] = {k: [] for k in LOOPS}
        finals = {}
        for r in range(-1, args.repeats):  # repeat -1: an untimed warm-up of each loop
            for key in rotated(list(LOOPS), r):
                model = copy.deepcopy(init)
                stamps: list[float] = []  # the time of each training forward
                model.register_forward_pre_hook(lambda m, a, stamps=stamps: stamps.append(time.perf_counter()))
                run = LOOPS[key][1](model, data, args.steps if r >= 0 else min(args.steps, 50), workers)
                cpu = time.thread_time()
                run()
                cpu = time.thread_time() - cpu
                if r >= 0:
                    steady = (len(stamps) - 1 - SKIP) * BATCH / (stamps[-1] - stamps[SKIP])
                    times[key].append(steady if workers else cpu / args.steps * 1e6)
                    finals[key] = [p.detach().clone() for p in model.parameters()]
        same = all(torch.equal(p, q) for k in LOOPS for p, q in zip(finals["hand"], finals[k]))
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = " | ".join(f"{med[k]:.0f} ({spread(times[k], '{:.0f}')})" for k in LOOPS)
        ratio = {k: med["hand"] / med[k] if workers else med[k] / med["hand"] for k in LOOPS}
        print(f"| {case} | {cells} | {ratio.get('before', float('nan')):.3f}x | {ratio['after']:.3f}x | "
              f"{ratio['off']:.3f}x |"
              + ("" if same else " (weights differ!)"), flush=True)
    print()
    print("ratios: cost against the hand-written loop (CPU time, or the hand loop's items/s over the loop's), "
          "so below 1 is faster than the hand-written loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["items", "steps"], default="items")
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--cases", nargs="+", default=["mlp", "conv", "wide"], choices=["mlp", "conv", "wide"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-before", action="store_true", help="leave out the eager loop (it is slow)")
    args = parser.parse_args()
    if args.skip_before:
        del LOOPS["before"]
    torch.set_num_threads(1)
    part_items(args) if args.part == "items" else part_steps(args)


if __name__ == "__main__":
    main()
