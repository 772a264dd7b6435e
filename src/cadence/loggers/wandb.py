"""Weights & Biases, offline: the run is written under ``RUN/wandb/`` and nothing leaves the machine.

Upload later with ``wandb sync RUN/wandb/offline-run-*``. Setting ``WANDB_MODE=online`` in the environment
sends it live instead. Needs ``pip install "cadence[wandb]"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .build import scalars


class WandbLogger:
    """One W&B run per ``fit()``: scalars at each record's step, the flattened config as its config."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], start_step: int = 0) -> None:
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cadence"),
            name=run_dir.resolve().name,
            dir=str(run_dir),  # wandb adds the wandb/ folder itself
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            reinit="create_new",  # several trainers in one process each get their own run
            # console="off": cadence prints its own progress; W&B would otherwise rewire sys.stdout.
            settings=wandb.Settings(console="off", silent=True),
        )
        if start_step:
            self.run.summary["resumed_from_step"] = start_step

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()
