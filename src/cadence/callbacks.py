"""The callback protocol: a handful of events, called by the outer loop, never from inside the step.

A callback is any object with some of these methods; the trainer calls only those it has. Set
``trainer.should_stop = True`` from any event to end ``fit()`` after the current step. A callback with
``state_dict``/``load_state_dict`` has its state saved in checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import Trainer

EVENTS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_log", "on_validation_start", "on_validation_end",
          "on_fit_end")


class Callback:
    """Base class with every event as a no-op; subclassing it is optional (duck typing works too)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has restored the state)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before the first step of each epoch (not for an epoch a resume lands in the middle of)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step; ``trainer.step`` counts it. Keep it cheap: it runs every step."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """At each log point, with the record written to ``metrics.jsonl`` (train or val)."""

    def on_validation_start(self, trainer: Trainer) -> None:
        """Before each evaluation pass (``validate()``, ``validate(data)``, ``test(data)``)."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each evaluation pass, with its averaged metrics (``val/loss``, ``val/<part>``, ``test/loss``...)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step, once the final weights are in the model."""


def bind(callbacks: list[Any], event: str) -> list[Any]:
    """The bound methods for ``event`` of the callbacks that implement it (not the base no-ops)."""
    bound = []
    for cb in callbacks:
        method = getattr(cb, event, None)
        if method is None or getattr(type(cb), event, None) is getattr(Callback, event):
            continue
        bound.append(method)
    return bound
