"""The fast optimizer switch: ``fused=True`` (or ``optimizer_options={"fused": True}``) picks PyTorch's fused
AdamW kernel (CPU and CUDA). The default ``"adamw"`` stays bitwise-equal to ``torch.optim.AdamW``; the fused
kernel differs from it in the last bits only (the bound below is what docs/trainer.md states)."""

from __future__ import annotations

import pytest
import torch

from cadence import Trainer
from helpers import MLP, make_data

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 50
FUSED_BOUND = 1e-6  # max abs difference of any weight after 50 steps (measured: about 1.2e-7 here)


def weights(**kw) -> list[torch.Tensor]:
    t = Trainer(MLP(seed=0), make_data(64), batch_size=16, max_steps=STEPS, lr=1e-2, weight_decay=0.1,
                progress=False, device="cpu", **kw)
    t.fit()
    return [p.detach().clone() for p in t.model.parameters()]


def test_default_adamw_is_torch_adamw_bitwise_and_fused_differs_in_the_last_bits():
    default = weights()
    torch_adamw = weights(optimizer=lambda groups: torch.optim.AdamW(groups))
    assert all(torch.equal(a, b) for a, b in zip(default, torch_adamw))

    fused = weights(optimizer_options={"fused": True})
    by_hand = weights(optimizer=lambda groups: torch.optim.AdamW(groups, fused=True))
    assert all(torch.equal(a, b) for a, b in zip(fused, by_hand))  # the switch is torch's own fused kernel
    diff = max((a - b).abs().max().item() for a, b in zip(default, fused))
    assert 0 < diff < FUSED_BOUND  # not bitwise: another order of the same float32 operations


def test_fused_argument_is_the_same_switch():
    assert all(torch.equal(a, b) for a, b in zip(weights(fused=True), weights(optimizer_options={"fused": True})))
    assert all(torch.equal(a, b) for a, b in zip(weights(fused=False), weights()))  # on the CPU: the default


@pytest.mark.parametrize("kw, fix", [
    ({"fused": "yes"}, "use true"),
    ({"fused": True, "optimizer": "lion"}, "lion has no fused kernel"),
    ({"fused": True, "optimizer": lambda groups: torch.optim.AdamW(groups)}, "optimizer chosen by name"),
    ({"fused": True, "optimizer_options": {"fused": False}}, "give it once"),
])
def test_bad_fused_names_the_fix(kw, fix):
    from cadence import ConfigError

    with pytest.raises(ConfigError, match=f"^fused=.*{fix}"):
        Trainer(MLP(), make_data(64), max_steps=2, progress=False, **kw)
