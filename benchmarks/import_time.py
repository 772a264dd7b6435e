"""How much `import cadence` adds over `import torch`: fresh interpreters, alternated, medians compared.

usage: python benchmarks/import_time.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from common import timed_import

CASES = {
    "torch": "import torch",
    "torch + cadence": "import torch; import cadence",
    "torch + cadence.cli": "import torch; import cadence.cli.main; cadence.cli.main.root_parser()",
}


def timed(code: str) -> float:
    return timed_import(code)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for code in CASES.values():  # warm the file cache once
        timed(code)
    for _ in range(args.repeats):
        for name, code in CASES.items():
            times[name].append(timed(code))
    base = statistics.median(times["torch"])
    print(f"{'case':24} {'median s':>9} {'over torch s':>13}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:24} {median:9.3f} {median - base:13.3f}")
    # the lazy parts must stay lazy: the trainer alone loads no CLI library and no tracker
    probe = ("import sys, cadence; bad = [m for m in ('jsonargparse', 'tensorboard', 'wandb', 'mlflow', "
             "'matplotlib', 'sklearn') if m in sys.modules]; print('lazy imports ok' if not bad else bad)")
    print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
