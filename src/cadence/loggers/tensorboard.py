"""TensorBoard: event files in ``RUN/tensorboard/``, through torch's own ``SummaryWriter``.

View with ``tensorboard --logdir RUN/tensorboard`` (or a folder of runs). Needs ``pip install
"cadence[tensorboard]"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .build import scalars


class TensorBoardLogger:
    """Scalars at each record's step; the config as hyperparameters (HPARAMS tab) and as text (TEXT tab)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.folder = Path(run_dir) / "tensorboard"
        # On resume from step s, TensorBoard hides what the earlier attempt logged after s (steps >= s + 1).
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=start_step + 1 if start_step else None)
        if config:
            experiment, start, _ = hparams(config, {})
            for summary in (experiment, start):
                self.writer.file_writer.add_summary(summary)
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), start_step)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()  # log points are rare; flushing each lets a live TensorBoard follow the run

    def close(self) -> None:
        self.writer.close()
