"""Tiny models, data and helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cadence import Trainer

IN, HIDDEN, OUT = 8, 32, 2


def make_data(n: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random inputs of width 8 and binary labels, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


class MLP(nn.Module):
    """8 -> 32 -> 2, no dropout; ``forward(x, y)`` returns the mean cross-entropy."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


class SumMLP(MLP):
    """Returns ``{"loss": summed cross-entropy, "num_items": n}``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:  # type: ignore[override]
        return {"loss": F.cross_entropy(self.net(x), y, reduction="sum"), "num_items": len(y)}


class IndexedMLP(MLP):
    """``forward(x, y, idx)``: records every batch's ``idx``: in ``seen`` when training, else ``seen_eval``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.seen: list[torch.Tensor] = []
        self.seen_eval: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (self.seen if self.training else self.seen_eval).append(idx.clone())
        return F.cross_entropy(self.net(x), y)


class PairDataset(Dataset):
    """A plain map-style dataset (``__getitem__``/``__len__``) over the same tensors as the in-memory path."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors
        self.calls = 0

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        return tuple(t[i] for t in self.tensors)


def trainer(model: nn.Module, data: Any, **kw: Any) -> Trainer:
    """A ``Trainer`` with test defaults: cpu, no progress output."""
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return Trainer(model, data, **kw)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def assert_weights_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs (max abs diff {(sa[k] - sb[k]).abs().max().item()})"


def assert_weights_close(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=f"{k} differs")


def assert_weights_changed(before: nn.Module, after: nn.Module) -> None:
    sa, sb = before.state_dict(), after.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa), "training did not change the weights"


def epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The contract's permutation of epoch ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def contract_batches(n: int, global_batch: int, seed: int, steps: int, drop_last: bool = False) -> list[torch.Tensor]:
    """The global index batch of every optimizer step for ``steps`` steps under the data order contract."""
    out: list[torch.Tensor] = []
    epoch = 0
    while len(out) < steps:
        perm = epoch_perm(n, seed, epoch)
        for start in range(0, n, global_batch):
            chunk = perm[start:start + global_batch]
            if drop_last and len(chunk) < global_batch:
                break
            out.append(chunk)
            if len(out) == steps:
                break
        epoch += 1
    return out


class Events:
    """A duck-typed callback recording every event it gets (it does not subclass ``cadence.Callback``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.logs: list[dict[str, Any]] = []
        self.val_metrics: list[dict[str, float]] = []
        self.lrs: list[list[float]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append(("on_fit_start", trainer.step))

    def on_step_end(self, trainer: Trainer) -> None:
        self.calls.append(("on_step_end", trainer.step))
        self.lrs.append([g["lr"] for g in trainer.optimizer.param_groups])

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.calls.append(("on_log", trainer.step))
        self.logs.append(record)

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.calls.append(("on_validation_end", trainer.step))
        self.val_metrics.append(dict(metrics))

    def on_fit_end(self, trainer: Trainer) -> None:
        self.calls.append(("on_fit_end", trainer.step))

    def steps_of(self, event: str) -> list[int]:
        return [s for e, s in self.calls if e == event]


class CrashAt:
    """Raises at the end of step ``step``: a crash after that step's update, before its checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Any) -> None:
        if trainer.step == self.step:
            raise RuntimeError(f"simulated crash at step {trainer.step}")
