"""Optimizers by name with ``optimizer_options``: the same updates as torch's own classes built by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cadence import ConfigError
from cadence.optim import Lion, option_names
from helpers import MLP, assert_weights_changed, assert_weights_equal, clone, contract_batches, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

N, B, STEPS = 50, 16, 8


def hand_run(model: torch.nn.Module, make: Any) -> None:
    """``STEPS`` steps in the contract order (seed 0) with ``make(groups)``'s optimizer, groups as cadence's."""
    x, y = make_data(N)
    params = list(model.parameters())
    opt = make([{"params": [q for q in params if q.ndim >= 2]}, {"params": [q for q in params if q.ndim < 2]}])
    for idx in contract_batches(N, B, 0, STEPS):
        model(x[idx], y[idx]).backward()
        opt.step()
        opt.zero_grad()


CASES = [
    ("adamw", None, lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.0)),
    ("adamw", {}, lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.0)),
    ("adam", {"betas": [0.9, 0.99], "eps": 1e-6}, lambda g: torch.optim.Adam(g, lr=1e-2, betas=(0.9, 0.99), eps=1e-6)),
    ("adamw", {"betas": [0.8, 0.95], "amsgrad": True},
     lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.8, 0.95), amsgrad=True, weight_decay=0.0)),
    ("sgd", {"momentum": 0.9, "nesterov": True}, lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, nesterov=True)),
    ("lion", {"betas": [0.95, 0.98]}, lambda g: Lion(g, lr=1e-2, betas=(0.95, 0.98))),
]


@pytest.mark.parametrize("name,options,make", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_options_give_the_same_updates_as_the_torch_class_by_hand(name, options, make):
    model = MLP(seed=1)
    reference, initial = clone(model), clone(model)
    t = trainer(model, make_data(N), batch_size=B, max_steps=STEPS, optimizer=name, lr=1e-2,
                optimizer_options=options)
    t.fit()
    hand_run(reference, make)
    assert_weights_changed(initial, model)
    assert_weights_equal(model, reference)  # bitwise
    if options and "betas" in options:
        assert all(g["betas"] == tuple(options["betas"]) and isinstance(g["betas"], tuple)
                   for g in t.optimizer.param_groups)  # the YAML list became the tuple torch expects


def test_options_change_the_update():
    """Guard for the test above: the options really reach the optimizer."""
    a, b = MLP(seed=1), MLP(seed=1)
    trainer(a, make_data(N), batch_size=B, max_steps=4, optimizer="adam").fit()
    trainer(b, make_data(N), batch_size=B, max_steps=4, optimizer="adam", optimizer_options={"betas": [0.5, 0.9]}).fit()
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_options_follow_the_optimizer_through_stages():
    from cadence import Stage

    t = trainer(MLP(), make_data(N), batch_size=B, optimizer="adam", optimizer_options={"eps": 1e-3},
                stages=[Stage(steps=2, trainable=["net.0.*"]), Stage(steps=2)])
    t.fit()
    assert t.stage_index == 1 and all(g["eps"] == 1e-3 for g in t.optimizer.param_groups)


def test_option_names_are_the_torch_constructors_own():
    assert {"betas", "eps", "amsgrad"} <= set(option_names("adamw"))
    assert {"momentum", "dampening", "nesterov"} <= set(option_names("sgd"))
    assert option_names("lion") == ["betas"]
    assert not {"lr", "weight_decay", "params"} & set(option_names("adam"))


@pytest.mark.parametrize("overrides,pieces", [
    ({"optimizer": "adamw", "optimizer_options": {"momentum": 0.9}},
     ["optimizer_options={'momentum': 0.9}", "adamw has no option 'momentum'", "betas, eps"]),
    ({"optimizer": "lion", "optimizer_options": {"eps": 1e-8}}, ["lion has no option 'eps'", "options are betas"]),
    ({"optimizer": "sgd", "optimizer_options": {"betas": [0.9, 0.99]}}, ["sgd has no option 'betas'", "momentum"]),
    ({"optimizer": "adam", "optimizer_options": {"weight_decay": 0.1}}, ["weight_decay", "Trainer's own argument"]),
    ({"optimizer": "adam", "optimizer_options": {"betas": [1.5, 0.9]}}, ["optimizer_options=", "adam refused"]),
    ({"optimizer": lambda groups: torch.optim.SGD(groups), "optimizer_options": {"momentum": 0.9}},
     ["optimizer_options=", "chosen by name"]),
    ({"optimizer": "adam", "optimizer_options": [0.9, 0.99]}, ["optimizer_options=[0.9, 0.99]", "mapping"]),
])
def test_bad_options_are_refused_naming_the_valid_ones(overrides, pieces):
    with pytest.raises(ConfigError) as err:
        trainer(MLP(), make_data(N), batch_size=B, max_steps=2, **overrides)
    for piece in pieces:
        assert piece in str(err.value), (piece, str(err.value))
