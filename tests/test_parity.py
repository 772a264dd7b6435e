"""Parity with a hand-written loop that follows the data order contract: bitwise in fp32, allclose with accumulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import (
    MLP,
    SumMLP,
    assert_weights_changed,
    assert_weights_close,
    assert_weights_equal,
    clone,
    epoch_perm,
    make_data,
    trainer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N, B, SEED = 50, 16, 0  # 50 % 16 != 0: every epoch ends with a partial batch of 2


def hand_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, steps: int, seed: int,
              lr: float = 1e-2, max_grad_norm: float | None = 0.5, weight_decay: float = 0.0) -> list[torch.Tensor]:
    """The reference trainer: contract order, AdamW (decay on matrices only), clipping over
    ``model.parameters()``. Returns the index batches it used."""
    params = list(model.parameters())
    groups = [{"params": [q for q in params if q.ndim >= 2], "weight_decay": weight_decay},
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups if weight_decay else params, lr=lr, weight_decay=0.0)
    used: list[torch.Tensor] = []
    epoch = 0
    model.train()
    while len(used) < steps:
        perm = epoch_perm(len(x), seed, epoch)
        for i in range(-(-len(x) // batch_size)):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = model(x[idx], y[idx])
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad()
            used.append(idx)
            if len(used) == steps:
                break
        epoch += 1
    return used


@pytest.mark.parametrize("seed", [0, 7])
def test_bitwise_parity_with_hand_written_loop(seed):
    x, y = make_data(N)
    model = MLP(seed=1)
    reference = clone(model)
    initial = clone(model)
    steps = 30  # 4 steps per epoch: crosses seven epoch boundaries, each with a partial last batch

    t = trainer(model, (x, y), batch_size=B, max_steps=steps, optimizer="adamw", lr=1e-2, max_grad_norm=0.5,
                seed=seed)
    t.fit()
    used = hand_loop(reference, x, y, batch_size=B, steps=steps, seed=seed)

    assert t.step == steps
    assert sum(len(i) for i in used) == steps * B - 7 * (B - 2)  # the partial batches were really taken
    assert_weights_changed(initial, model)
    assert_weights_equal(model, reference)


class DeepMLP(MLP):
    """Eight layers, 16 parameter tensors: enough terms that the order of the clipping norm's sum shows."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        torch.manual_seed(seed)
        layers = [nn.Linear(8, 32), nn.ReLU()] + [m for _ in range(6) for m in (nn.Linear(32, 32), nn.Tanh())]
        self.net = nn.Sequential(*layers, nn.Linear(32, 2))


def test_bitwise_parity_with_weight_decay_groups():
    """Two parameter groups (decayed matrices first): the clipping norm still sums in the model's order."""
    x, y = make_data(N)
    model = DeepMLP(seed=1)
    reference = clone(model)
    t = trainer(model, (x, y), batch_size=B, max_steps=12, optimizer="adamw", lr=1e-2, weight_decay=0.1,
                max_grad_norm=0.5)
    t.fit()
    hand_loop(reference, x, y, batch_size=B, steps=12, seed=0, weight_decay=0.1)
    assert len(t.optimizer.param_groups) == 2
    assert_weights_equal(model, reference)


def test_parity_fails_with_another_seed():
    """Guard for the test above: a different data order really gives different weights."""
    x, y = make_data(N)
    model = MLP(seed=1)
    reference = clone(model)
    trainer(model, (x, y), batch_size=B, max_steps=8, lr=1e-2, max_grad_norm=0.5, seed=0).fit()
    hand_loop(reference, x, y, batch_size=B, steps=8, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_bitwise_parity_tensor_dataset_and_without_clipping():
    x, y = make_data(N)
    model = MLP(seed=2)
    reference = clone(model)
    trainer(model, torch.utils.data.TensorDataset(x, y), batch_size=B, max_steps=9, lr=1e-2, seed=3).fit()
    hand_loop(reference, x, y, batch_size=B, steps=9, seed=3, max_grad_norm=None)
    assert_weights_equal(model, reference)


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_grad_accum_matches_the_larger_batch(grad_accum):
    x, y = make_data(N)
    small = MLP(seed=1)
    big = clone(small)
    initial = clone(small)
    b = 4
    # global batch 4*grad_accum; 50 items leave a partial last step, which accumulation splits unevenly
    kw = dict(max_steps=14, optimizer="adamw", lr=1e-2, max_grad_norm=0.5, seed=SEED)
    trainer(small, (x, y), batch_size=b, grad_accum=grad_accum, **kw).fit()
    trainer(big, (x, y), batch_size=b * grad_accum, grad_accum=1, **kw).fit()
    assert_weights_changed(initial, small)
    assert_weights_close(small, big, rtol=1e-5, atol=1e-6)


def test_grad_accum_matches_hand_loop_on_the_global_batch():
    x, y = make_data(N)
    model = MLP(seed=1)
    reference = clone(model)
    trainer(model, (x, y), batch_size=4, grad_accum=4, max_steps=10, lr=1e-2, max_grad_norm=0.5, seed=SEED).fit()
    hand_loop(reference, x, y, batch_size=16, steps=10, seed=SEED)
    assert_weights_close(model, reference, rtol=1e-5, atol=1e-6)


def test_num_items_summed_loss_with_accumulation_equals_mean_on_double_batch():
    x, y = make_data(N)
    summed = SumMLP(seed=1)
    mean = MLP(seed=1)
    assert_weights_equal(summed, mean)
    initial = clone(mean)
    kw = dict(max_steps=12, optimizer="adamw", lr=1e-2, max_grad_norm=0.5, seed=SEED)
    t = trainer(summed, (x, y), batch_size=8, grad_accum=2, log_every=1, **kw)
    t.fit()
    u = trainer(mean, (x, y), batch_size=16, grad_accum=1, log_every=1, **kw)
    u.fit()
    assert_weights_changed(initial, mean)
    assert_weights_close(summed, mean, rtol=1e-5, atol=1e-6)
    # the logged loss is the step's mean too, not the sum
    torch.testing.assert_close(torch.tensor(t.history["train/loss"]), torch.tensor(u.history["train/loss"]),
                               rtol=1e-5, atol=1e-6)


def test_num_items_with_uneven_token_counts():
    """Micro-batches with different item counts: the step's gradient is the mean over all items of the step."""

    class Masked(MLP):
        """Only items whose label is 1 count; returns the sum over them and their number."""

        def __init__(self, summed: bool) -> None:
            super().__init__(seed=4)
            self.summed = summed

        def forward(self, x, y):
            per_item = torch.nn.functional.cross_entropy(self.net(x), y, reduction="none")
            mask = (y == 1).float()
            if self.summed:
                return {"loss": (per_item * mask).sum(), "num_items": mask.sum()}
            return (per_item * mask).sum() / mask.sum()

    x, y = make_data(64, seed=5)
    a, b = Masked(summed=True), Masked(summed=False)
    kw = dict(max_steps=6, optimizer="sgd", lr=0.5, seed=SEED)
    trainer(a, (x, y), batch_size=8, grad_accum=4, **kw).fit()
    trainer(b, (x, y), batch_size=32, grad_accum=1, **kw).fit()
    assert_weights_close(a, b, rtol=1e-5, atol=1e-6)
    # guard: averaging the micro-batch means (the classic accumulation bug) would give other weights
    naive = Masked(summed=False)
    trainer(naive, (x, y), batch_size=8, grad_accum=4, **kw).fit()
    assert not all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(naive.parameters(), b.parameters()))


class DropoutMLP(MLP):
    def __init__(self) -> None:
        super().__init__(seed=6)
        self.net.insert(2, torch.nn.Dropout(0.3))


@pytest.mark.parametrize("kind", ["in_memory", "map_style"])
def test_bitwise_parity_with_dropout(kind):
    """fit() seeds torch with ``seed`` before the first step and draws nothing else from the global generator."""
    from helpers import PairDataset

    x, y = make_data(N)
    model = DropoutMLP()
    reference = clone(model)
    data = PairDataset(x, y) if kind == "map_style" else (x, y)
    trainer(model, data, batch_size=B, max_steps=10, lr=1e-2, max_grad_norm=0.5, seed=5).fit()
    torch.manual_seed(5)
    hand_loop(reference, x, y, batch_size=B, steps=10, seed=5)
    assert_weights_equal(model, reference)
    # guard: another dropout stream gives other weights
    other = DropoutMLP()
    torch.manual_seed(6)
    hand_loop(other, x, y, batch_size=B, steps=10, seed=5)
    assert any(not torch.equal(a, b) for a, b in zip(other.state_dict().values(), reference.state_dict().values()))


def test_bitwise_parity_with_a_dataloader_passed_in():
    x, y = make_data(N)
    model = MLP(seed=3)
    reference = clone(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    trainer(model, loader, max_steps=7, lr=1e-2, max_grad_norm=0.5).fit()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    batches = list(loader)
    for i in range(7):
        bx, by = batches[i % len(batches)]
        reference(bx, by).backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.5)
        opt.step()
        opt.zero_grad()
    assert_weights_equal(model, reference)
