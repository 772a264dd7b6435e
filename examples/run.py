"""What every recipe's ``main()`` does: ``cadence fit`` on its YAML, then its first and last training loss."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def run_recipe(config: Path, argv: list[str] | None = None) -> int:
    """``cadence fit --config CONFIG [argv]`` into ``runs/<time>-<recipe>`` (or ``--run-dir D``); prints the
    first and last logged training loss and returns the command's exit code."""
    from cadence.cli.main import main as cadence
    from cadence.runs import read_records

    argv = list(sys.argv[1:] if argv is None else argv)
    run = Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{config.stem}")
    for i, arg in enumerate(argv[:-1]):
        run = Path(argv[i + 1]) if arg in ("--run-dir", "--run_dir") else run
    code = cadence(["fit", "--config", str(config), "--run-dir", str(run), *argv])
    if code == 0:
        losses = [r["loss"] for r in read_records(run) if r["split"] == "train" and "loss" in r]
        print(f"{config.stem}: first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}", flush=True)
    return code
