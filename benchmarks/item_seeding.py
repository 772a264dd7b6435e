"""The cost of per-item seeding (``item_seeding=True``): the time to read one item through cadence's seeded
dataset wrapper against reading it plainly, in the main process (seed, read, put the generators back once per
micro-batch) and as a worker does it (no putting back).

    .venv/bin/python benchmarks/item_seeding.py [--items 20000] [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import median, spread
from torch.utils.data import Dataset

from cadence.data import seeding


class Tiny(Dataset):
    """An item that costs almost nothing to read, so the seeding cost is what shows."""

    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 16)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def per_item_us(read, n: int, batch: int) -> float:
    start = time.perf_counter()
    for b in range(0, n, batch):
        read((0, b // batch, list(range(b, min(b + batch, n)))))
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Tiny(args.items)
    plain = lambda key: [data[i] for i in key[2]]
    seeded = seeding.SeededItems(data, seed=0, per_item=True)
    in_worker = seeding.get_worker_info
    cases = {"plain __getitem__": plain, "item_seeding, main process": seeded.__getitems__}
    results: dict[str, list[float]] = {name: [] for name in cases}
    results["item_seeding, in a worker"] = []
    for _ in range(args.repeats):
        for name, read in cases.items():
            results[name].append(per_item_us(read, args.items, args.batch))
        seeding.get_worker_info = lambda: object()  # as in a worker: the generators are not put back
        try:
            results["item_seeding, in a worker"].append(per_item_us(seeded.__getitems__, args.items, args.batch))
        finally:
            seeding.get_worker_info = in_worker
    base = median(results["plain __getitem__"])
    print(f"{args.items} items, micro-batches of {args.batch}, median of {args.repeats} (min-max):")
    for name, values in results.items():
        med = median(values)
        print(f"  {name:30s} {med:6.2f} us/item ({spread(values, '{:.2f}')}); "
              f"+{med - base:.2f} us over plain")


if __name__ == "__main__":
    main()
