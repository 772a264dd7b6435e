"""No host-device sync per step: losses stay on the device and are read once per ``log_every`` steps."""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch

from helpers import MLP, SumMLP, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LOG_EVERY = 200, 50
LOG_POINTS = STEPS // LOG_EVERY + 1  # 5: step 1, then every LOG_EVERY steps
SLACK = 3
TORCH_OPTIM = os.path.join(os.path.dirname(torch.__file__), "optim") + os.sep


class SyncCounter:
    """Wraps ``Tensor.item``/``.cpu``/``.tolist``; records who called them."""

    NAMES = ("item", "cpu", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.callers: list[str] = []
        self.active = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            if self.active:
                frame = sys._getframe(1)
                self.callers.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                self.calls[name] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def total(self, skip_torch_optim: bool = False) -> int:
        if not skip_torch_optim:
            return len(self.callers)
        return sum(1 for c in self.callers if not c.startswith(TORCH_OPTIM))


def counted_fit(monkeypatch, model, data, **kw):
    t = trainer(model, data, max_steps=STEPS, log_every=LOG_EVERY, **kw)
    counter = SyncCounter(monkeypatch)
    counter.active = True
    t.fit()
    counter.active = False
    assert t.step == STEPS
    assert len([r for r in t.history if r["split"] == "train"]) == LOG_POINTS  # a record per log point
    return t, counter


def test_counter_sees_calls(monkeypatch):
    """Guard: the wrappers are really in place (a counter that never counts proves nothing)."""
    counter = SyncCounter(monkeypatch)
    counter.active = True
    torch.ones(2).sum().item()
    torch.ones(2).tolist()
    torch.ones(2).cpu()
    assert counter.calls == Counter({"item": 1, "tolist": 1, "cpu": 1})


@pytest.mark.parametrize("grad_accum,max_grad_norm", [(1, None), (1, 1.0), (2, 1.0)])
def test_no_sync_per_step_sgd(monkeypatch, grad_accum, max_grad_norm):
    """SGD calls nothing on the host, so every counted call is cadence's own."""
    _, counter = counted_fit(monkeypatch, MLP(), make_data(64), batch_size=8, grad_accum=grad_accum,
                             optimizer="sgd", lr=0.05, max_grad_norm=max_grad_norm)
    assert counter.total() <= LOG_POINTS + SLACK, counter.callers
    assert counter.total() < STEPS // 10


def test_no_sync_per_step_num_items(monkeypatch):
    """The summed-loss path (division by the step's items) stays on the device too."""
    _, counter = counted_fit(monkeypatch, SumMLP(), make_data(64), batch_size=8, grad_accum=2, optimizer="sgd",
                             lr=0.05, max_grad_norm=1.0)
    assert counter.total() <= LOG_POINTS + SLACK, counter.callers


def test_no_sync_per_step_adamw(monkeypatch):
    """AdamW on the CPU reads its own step counters (``torch.optim``'s business, not a device sync on GPU
    where the counters live on the host); everything else must stay off the host."""
    _, counter = counted_fit(monkeypatch, MLP(), make_data(64), batch_size=8, optimizer="adamw", lr=1e-3,
                             max_grad_norm=1.0)
    assert counter.total(skip_torch_optim=True) <= LOG_POINTS + SLACK, counter.callers


def test_log_points_read_the_device_means(monkeypatch):
    """The values logged at each point are the mean of that window's step losses."""
    losses: list[torch.Tensor] = []

    class Recording(MLP):
        def forward(self, x, y):
            loss = super().forward(x, y)
            losses.append(loss.detach().clone())
            return loss

    t, _ = counted_fit(monkeypatch, Recording(), make_data(64), batch_size=8, optimizer="sgd", lr=0.05)
    logged = t.history["train/loss"]
    bounds = [0, 1, *range(LOG_EVERY, STEPS + 1, LOG_EVERY)]  # step 1 alone, then windows of LOG_EVERY steps
    assert len(logged) == len(bounds) - 1
    for k, value in enumerate(logged):
        window = torch.stack(losses[bounds[k]:bounds[k + 1]])
        assert value == pytest.approx(window.mean().item(), rel=1e-5)


def test_no_sync_per_step_with_tokens_and_mfu(monkeypatch):
    """tokens_per_s and the MFU come from shapes and a FLOP count taken once: no host transfer per step."""
    ids = torch.randint(0, 17, (64, 9), generator=torch.Generator().manual_seed(0))

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(17, 8), torch.nn.Linear(8, 17)

        def forward(self, x, y):
            return torch.nn.functional.cross_entropy(self.head(self.embed(x)).flatten(0, 1), y.flatten())

    t, counter = counted_fit(monkeypatch, TinyLM(), (ids[:, :-1], ids[:, 1:]), batch_size=8, optimizer="sgd",
                             lr=0.05, flops_per_item="count", peak_flops=1e9)
    assert counter.total() <= LOG_POINTS + SLACK, counter.callers
    assert all("tokens_per_s" in r and "mfu" in r for r in t.history if r["split"] == "train")
