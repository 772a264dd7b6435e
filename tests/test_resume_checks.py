"""A resume never changes which items train, or in what order, silently: every option that decides them is
kept in the checkpoint (``trainer.json``) and a resume that changes one is refused, naming it and both values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cadence import ConfigError, Trainer
from cadence.data.identity import ORDER_ARGUMENTS, described
from helpers import MLP, assert_weights_equal, clone, make_data

pytestmark = pytest.mark.usefixtures("one_thread")

N = 60
GROUPS = [i % 5 for i in range(N)]
LABELS = [i % 2 for i in range(N)]
# the first run: a split by groups and balanced sampling, so that every option below is in play
BASE: dict[str, Any] = {"batch_size": 8, "max_steps": 4, "checkpoint_every": 2, "progress": False,
                        "valid_frac": 0.2, "split_by": GROUPS, "sampler": "balanced", "balance_by": LABELS}
SOURCES: dict[str, Any] = {"batch_size": 8, "max_steps": 4, "checkpoint_every": 2, "progress": False,
                           "mix": "sample", "source_weights": {"a": 1.0, "b": 2.0}}

# (name, the first run's arguments, the change on resume, the words of the refusal)
CHANGES: list[tuple[str, dict[str, Any], dict[str, Any], list[str]]] = [
    ("split_seed", BASE, {"split_seed": 3}, ["split_seed 0 -> 3"]),
    ("split_mode", BASE, {"split_mode": "stratified"}, ["split_mode groups -> stratified"]),
    ("valid_frac", BASE, {"valid_frac": 0.4}, ["valid_frac 0.2 -> 0.4"]),
    ("split_by", BASE, {"split_by": [i % 4 for i in range(N)]}, ["split_by 60 labels"]),
    ("shuffle", {**BASE, "sampler": None, "balance_by": None}, {"sampler": None, "balance_by": None,
                                                                  "shuffle": False}, ["shuffle True -> False"]),
    ("drop_last", BASE, {"drop_last": True}, ["drop_last False -> True"]),
    ("item_seeding", BASE, {"item_seeding": False}, ["item_seeding True -> False"]),
    ("sampler", BASE, {"sampler": "random", "balance_by": None}, ["sampler balanced -> random"]),
    ("balance_by", BASE, {"balance_by": [i % 3 for i in range(N)]}, ["balance_by 60 labels"]),
    ("seed", BASE, {"seed": 1}, ["seed 0 -> 1"]),
    ("batch_size", BASE, {"batch_size": 4}, ["batch_size 8 -> 4", "global batch", "new_global_batch"]),
    ("mix", SOURCES, {"mix": "each"}, ["mix sample -> each"]),
    ("source_weights", SOURCES, {"source_weights": {"a": 1.0, "b": 3.0}}, ["source_weights"]),
]


def data(kw: dict[str, Any]) -> Any:
    return {"a": make_data(N), "b": make_data(N, seed=1)} if "mix" in kw else make_data(N)


def test_every_order_argument_is_tried() -> None:
    assert set(ORDER_ARGUMENTS) - {c[0] for c in CHANGES} == set()


@pytest.mark.parametrize("first,change,words", [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_a_resume_that_changes_the_items_or_their_order_is_refused(tmp_path: Path, first: dict, change: dict,
                                                                   words: list[str]) -> None:
    run = tmp_path / "run"
    Trainer(MLP(), data(first), run_dir=run, **first).fit()
    model = MLP()
    before = clone(model)
    again = Trainer(model, data(first), run_dir=run, resume="auto", **{**first, "max_steps": 6, **change})
    with pytest.raises(ConfigError) as info:
        again.fit()
    message = str(info.value)
    fix = [] if "new_global_batch" in words else ["Put them back"]  # the global batch: how to keep it, or not
    for piece in ["the run changed since this checkpoint", *words, *fix]:
        assert piece in message, message
    assert again.step == 0
    assert_weights_equal(model, before)


def test_the_same_options_resume(tmp_path: Path) -> None:
    """Given again as other objects (a tuple for a list, split_mode named for its default), they are the same."""
    run = tmp_path / "run"
    Trainer(MLP(), make_data(N), run_dir=run, **BASE).fit()
    same = {**BASE, "split_by": tuple(GROUPS), "split_mode": "groups", "max_steps": 6}
    t = Trainer(MLP(), make_data(N), run_dir=run, resume="auto", **same)
    t.fit()
    assert t.step == 6


def test_a_function_is_described_by_its_name() -> None:
    assert described(len) == "function builtins.len"
    assert described({"a": [1, 2]}) == {"a": described([1, 2])} != {"a": described([2, 1])}
