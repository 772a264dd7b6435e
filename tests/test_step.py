"""The step's clipping: over all parameters at once, or each optimizer param group on its own."""

from __future__ import annotations

import pytest
import torch

from cadence import ConfigError
from helpers import MLP, assert_weights_changed, assert_weights_equal, clone, contract_batches, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

N, B, STEPS, NORM = 50, 16, 10, 0.05  # a small norm: every step clips


def hand_loop(model: torch.nn.Module, per_group: bool) -> list[float]:
    """AdamW over cadence's two groups (decayed matrices, then the rest); clipping each group by hand with
    ``clip_grad_norm_`` (or all at once). Returns each step's norm before clipping, over all groups."""
    x, y = make_data(N)
    params = list(model.parameters())
    groups = [{"params": [q for q in params if q.ndim >= 2], "weight_decay": 0.1},
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    norms: list[float] = []
    for idx in contract_batches(N, B, 0, STEPS):
        model(x[idx], y[idx]).backward()
        if per_group:
            group_norms = [torch.nn.utils.clip_grad_norm_(g["params"], NORM) for g in opt.param_groups]
            norms.append(float(torch.stack(group_norms).norm()))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, NORM)))
        opt.step()
        opt.zero_grad()
    return norms


def run(model: torch.nn.Module, per_group: bool):
    t = trainer(model, make_data(N), batch_size=B, max_steps=STEPS, lr=1e-2, weight_decay=0.1, max_grad_norm=NORM,
                clip_per_group=per_group, log_every=1)
    t.fit()
    return t


@pytest.mark.parametrize("per_group", [True, False])
def test_clipping_equals_clip_grad_norm_by_hand(per_group):
    model = MLP(seed=1)
    reference, initial = clone(model), clone(model)
    t = run(model, per_group)
    norms = hand_loop(reference, per_group)
    assert len(t.optimizer.param_groups) == 2
    assert_weights_changed(initial, model)
    assert_weights_equal(model, reference)  # bitwise
    # the logged grad_norm: the norm before clipping over all groups together, in both modes
    assert t.history["train/grad_norm"] == pytest.approx(norms, rel=1e-5)
    assert min(norms) > NORM


def test_clipping_per_group_differs_from_clipping_all_at_once():
    """Guard for the test above: the two modes really update differently."""
    a, b = MLP(seed=1), MLP(seed=1)
    run(a, True)
    run(b, False)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_clip_per_group_needs_max_grad_norm():
    with pytest.raises(ConfigError, match="clip_per_group=True.*max_grad_norm"):
        trainer(MLP(), make_data(N), max_steps=2, clip_per_group=True)
    with pytest.raises(ConfigError, match="clip_per_group='yes'"):
        trainer(MLP(), make_data(N), max_steps=2, max_grad_norm=1.0, clip_per_group="yes")
