"""MLflow, to a local SQLite store: ``RUN/mlflow/mlflow.db`` (artifacts in ``RUN/mlflow/artifacts``).

View with ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db`` (the full ``mlflow`` package).
Needs ``pip install "cadence[mlflow]"`` (``mlflow-skinny`` with SQLAlchemy and Alembic for the store).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .build import scalars

EXPERIMENT = "cadence"
PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch
MAX_VALUE = 6000  # MLflow's limit on a param value's length


class MlflowLogger:
    """One MLflow run per ``fit()``: metrics at each record's step, the flattened config as params."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], start_step: int = 0) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.folder = Path(run_dir) / "mlflow"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{(self.folder / 'mlflow.db').resolve()}"
        with _quiet("mlflow.store.db.utils", "alembic"):  # table creation logs at INFO
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = (self.folder / "artifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        tags = {"resumed_from_step": str(start_step)} if start_step else None
        self.run_id = self.client.create_run(experiment_id, run_name=Path(run_dir).resolve().name,
                                             tags=tags).info.run_id
        params = [Param(k, str(v)[:MAX_VALUE]) for k, v in config.items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_BATCH])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record["step"]) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the duration, then put their levels back."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
