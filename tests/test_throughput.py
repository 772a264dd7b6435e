"""tokens_per_s and MFU at each log point (cadence/throughput.py): from the batches' shapes and a FLOP count taken
once, never from the device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cadence import ConfigError
from cadence.throughput import token_field
from helpers import HIDDEN, IN, MLP, OUT, assert_weights_equal, make_data, trainer

VOCAB, LENGTH, WIDTH = 17, 12, 16


class TinyLM(nn.Module):
    """Token ids (batch, length) -> next-token cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.embed(ids)).flatten(0, 1), targets.flatten())


def token_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, LENGTH + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1], ids[:, 1:]


def train_records(t) -> list[dict]:
    return [r for r in t.history if r["split"] == "train"]


def test_token_sequences_give_tokens_per_s():
    t = trainer(TinyLM(), token_data(), batch_size=8, grad_accum=2, max_steps=6, log_every=2)
    t.fit()
    records = train_records(t)
    assert len(records) == 4
    for r in records:  # the same window and clock: exactly LENGTH tokens per sample
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * LENGTH, rel=1e-12)
        assert "mfu" not in r


def test_tokens_per_item_or_none_for_other_items():
    plain = trainer(MLP(), make_data(64), batch_size=8, max_steps=4, log_every=2)
    plain.fit()
    assert all("tokens_per_s" not in r for r in train_records(plain))  # float features are not tokens
    told = trainer(MLP(), make_data(64), batch_size=8, max_steps=4, log_every=2, tokens_per_item=5)
    told.fit()
    assert all(r["tokens_per_s"] == pytest.approx(5 * r["samples_per_s"], rel=1e-12) for r in train_records(told))
    never = trainer(TinyLM(), token_data(), batch_size=8, max_steps=2, tokens_per_item=0)
    never.fit()
    assert all("tokens_per_s" not in r for r in train_records(never))


def test_token_field_is_an_integer_batch_by_length_tensor():
    ids = torch.zeros(4, 7, dtype=torch.long)
    assert token_field((ids, ids)) is ids and token_field({"mask": ids.float(), "input_ids": ids}) is ids
    assert token_field(ids) is ids and token_field(ids.int()) is not None
    assert token_field((ids.float(), ids)) is None  # features first
    assert token_field(torch.zeros(4, 3, 8, 8, dtype=torch.uint8)) is None  # images
    assert token_field(torch.zeros(4, dtype=torch.long)) is None  # labels


def test_mfu_from_given_flops_per_item():
    t = trainer(TinyLM(), token_data(), batch_size=8, max_steps=4, log_every=2, flops_per_item=3e6,
                peak_flops=1e12)
    t.fit()
    for r in train_records(t):
        assert r["mfu"] == pytest.approx(3e6 * r["samples_per_s"] / 1e12, rel=1e-12)


def test_flops_counted_once_by_torchs_counter_leave_the_run_unchanged():
    counted = trainer(MLP(), make_data(64), batch_size=8, grad_accum=2, max_steps=6, log_every=2,
                      flops_per_item="count", peak_flops=1e9)
    counted.fit()
    # per item: forward 2 * (IN * HIDDEN + HIDDEN * OUT); backward the weight gradients of both layers and the
    # input gradient of the second (the inputs need none): 2 * IN * HIDDEN + 2 * 2 * HIDDEN * OUT
    per_item = 2 * (IN * HIDDEN + HIDDEN * OUT) + 2 * IN * HIDDEN + 4 * HIDDEN * OUT
    assert counted.records.throughput.flops_per_item == per_item
    for r in train_records(counted):
        assert r["mfu"] == pytest.approx(per_item * r["samples_per_s"] / 1e9, rel=1e-12)
    plain = trainer(MLP(), make_data(64), batch_size=8, grad_accum=2, max_steps=6, log_every=2)
    plain.fit()
    assert_weights_equal(counted.model, plain.model)  # the counter only watched


@pytest.mark.parametrize("kwargs,pieces", [
    ({"tokens_per_item": -1}, ["tokens_per_item=-1"]),
    ({"flops_per_item": "many"}, ["flops_per_item='many'", '"count"']),
    ({"flops_per_item": 0}, ["flops_per_item=0"]),
    ({"flops_per_item": 1e6, "peak_flops": -1.0}, ["peak_flops=-1.0"]),
    ({"peak_flops": 1e12}, ["peak_flops=1000000000000.0", "flops_per_item"]),
])
def test_bad_throughput_arguments(kwargs, pieces):
    with pytest.raises(ConfigError) as info:
        trainer(MLP(), make_data(16), max_steps=1, **kwargs)
    for piece in pieces:
        assert piece in str(info.value)
