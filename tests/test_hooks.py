"""The callback events and their documented order (docs/trainer.md, "Callbacks")."""

from __future__ import annotations

from typing import Any

import pytest

from cadence import Callback
from helpers import MLP, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Order(Callback):
    """Notes every event as ``(event, step)``; its ``state_dict`` (called when a checkpoint is taken) as "save"."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.trainer: Any = None

    def _note(self, event: str, trainer: Any) -> None:
        self.trainer = trainer
        self.calls.append((event, trainer.step))

    def on_fit_start(self, trainer):
        self._note("fit_start", trainer)

    def on_epoch_start(self, trainer):
        self._note("epoch_start", trainer)

    def on_step_end(self, trainer):
        self._note("step_end", trainer)

    def on_log(self, trainer, record):
        self._note(f"log:{record['split']}", trainer)

    def on_validation_start(self, trainer):
        assert trainer.model.training  # the pass has not begun
        self._note("validation_start", trainer)

    def on_validation_end(self, trainer, metrics):
        self._note(f"validation_end:{','.join(sorted(metrics))}", trainer)

    def on_fit_end(self, trainer):
        self._note("fit_end", trainer)

    def state_dict(self) -> dict[str, Any]:
        self.calls.append(("save", self.trainer.step))
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_events_come_in_the_documented_order(tmp_path):
    order = Order()
    # 32 items, batch 8: 4 steps per epoch; validation at each epoch end; a log every step; a save every 2
    trainer(MLP(), make_data(32), val_data=make_data(16, seed=1), batch_size=8, max_epochs=2, log_every=1,
            checkpoint_every=2, run_dir=tmp_path / "run", callbacks=[order]).fit()
    val_end = "validation_end:val/loss"
    assert order.calls == [
        ("fit_start", 0),
        ("epoch_start", 0),
        ("step_end", 1), ("log:train", 1),
        ("step_end", 2), ("log:train", 2), ("save", 2),  # on_step_end runs before that step's checkpoint
        ("step_end", 3), ("log:train", 3),
        ("step_end", 4), ("log:train_epoch", 4), ("log:train", 4),
        ("validation_start", 4), ("log:val", 4), (val_end, 4), ("save", 4),
        ("epoch_start", 4),
        ("step_end", 5), ("log:train", 5),
        ("step_end", 6), ("log:train", 6), ("save", 6),
        ("step_end", 7), ("log:train", 7),
        ("step_end", 8), ("log:train_epoch", 8), ("log:train", 8),
        ("validation_start", 8), ("log:val", 8), (val_end, 8), ("save", 8),
        ("fit_end", 8),
    ]


def epoch_starts(tmp_path, max_steps: int) -> list[int]:
    order = Order()
    trainer(MLP(), make_data(32), batch_size=8, max_steps=max_steps, run_dir=tmp_path, resume="auto",
            callbacks=[order]).fit()
    return [s for e, s in order.calls if e == "epoch_start"]


@pytest.mark.parametrize("first,expected", [(4, [4, 8]), (6, [8])], ids=["at_epoch_end", "mid_epoch"])
def test_a_resume_starts_an_epoch_only_at_its_beginning(tmp_path, first, expected):
    assert epoch_starts(tmp_path, first) == ([0, 4] if first > 4 else [0])
    assert epoch_starts(tmp_path, 12) == expected


def test_validation_hooks_run_around_every_evaluation_pass():
    order = Order()
    t = trainer(MLP(), make_data(32), val_data=make_data(16, seed=1), batch_size=8, max_steps=2,
                callbacks=[order])
    t.test(make_data(8, seed=2))
    assert order.calls == [("validation_start", 0), ("log:test", 0), ("validation_end:test/loss", 0)]
