"""Iterables as training data: a stateful stream resumes without replay (its state that of exactly the batches
trained on), one without state is replayed with a one-time warning, an IterableDataset with ``__len__`` is
batched and trains, and torchdata's StatefulDataLoader (passed in, or made for workers) resumes exactly."""

from __future__ import annotations

import json
import multiprocessing
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cadence import ConfigError
from helpers import MLP, CrashAt, PairDataset, assert_weights_equal, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

N, BATCH = 50, 8


class Stream(IterableDataset):
    """Items of ``make_data(50)`` in an order seeded by its own epoch counter; its position is its state.

    Counts what it does: ``iters`` (calls of ``__iter__``) and ``seen`` (the items it yielded, in order).
    With several DataLoader workers, worker ``w`` of ``k`` yields the positions ``p`` with ``p % k == w``.
    """

    def __init__(self) -> None:
        self.x, self.y = make_data(N)
        self.pos, self.epoch, self.iters = 0, 0, 0
        self.seen: list[int] = []

    def __iter__(self):
        self.iters += 1
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        worker = get_worker_info()
        while self.pos < N:
            p = self.pos
            self.pos += 1
            if worker is not None and p % worker.num_workers != worker.id:
                continue
            self.seen.append(perm[p])
            yield self.x[perm[p]], self.y[perm[p]]
        self.pos, self.epoch = 0, self.epoch + 1

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos, self.epoch = state["pos"], state["epoch"]


class SizedStream(Stream):
    def __len__(self) -> int:
        return N


class StatelessSizedStream(SizedStream):
    state_dict = None  # type: ignore[assignment]  # no state: the replaying path


class Batches:
    """A re-iterable of batches with no state (nor length): resuming it means replaying it."""

    def __init__(self) -> None:
        self.x, self.y = make_data(N)
        self.iters = 0

    def __iter__(self):
        self.iters += 1
        for i in range(0, N, BATCH):
            yield self.x[i:i + BATCH], self.y[i:i + BATCH]


def crash_and_resume(make_data_: Any, tmp_path: Path, crash: int = 5, every: int = 3, **kw: Any):
    """Trains with a crash after step ``crash`` (checkpoints every ``every``), then resumes to the end on a
    fresh copy of the data; returns the resumed model, its trainer and its data."""
    try:
        trainer(MLP(), make_data_(), run_dir=tmp_path, checkpoint_every=every, callbacks=[CrashAt(crash)],
                **kw).fit()
    except RuntimeError as err:
        assert "simulated crash" in str(err)
    model, data = MLP(), make_data_()
    t = trainer(model, data, run_dir=tmp_path, resume="auto", **kw)
    t.fit()
    return model, t, data


@pytest.mark.parametrize("cls", [Stream, SizedStream], ids=["no-len", "len"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_stateful_iterable_resumes_without_replay(cls, grad_accum, tmp_path):
    kw = dict(batch_size=BATCH, grad_accum=grad_accum, max_steps=10)
    straight, full = MLP(), cls()
    trainer(straight, full, **kw).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no replay warning
        resumed, t, data = crash_and_resume(cls, tmp_path, **kw)
    assert_weights_equal(straight, resumed)
    saved = json.loads((tmp_path / "checkpoints" / "step-000000003" / "trainer.json").read_text())["data"]
    consumed = 3 * grad_accum * BATCH  # 3 steps of grad_accum micro-batches, all in epoch 0
    assert saved["iterable"] == {"pos": consumed, "epoch": 0}  # no micro-batch read ahead is counted
    # the resumed run read on from there: not one item of the 3 steps before was read again
    assert data.seen == full.seen[consumed:consumed + len(data.seen)]
    assert data.iters == full.iters  # one __iter__ per epoch, as in the uninterrupted run


def test_iterable_without_state_is_replayed_with_one_warning(tmp_path):
    kw = dict(batch_size=BATCH, max_steps=16)  # 7 batches per epoch: the resume is in the second epoch
    straight = MLP()
    trainer(straight, Batches(), **kw).fit()
    with pytest.warns(UserWarning, match="no state_dict") as caught:
        resumed, t, data = crash_and_resume(Batches, tmp_path, crash=11, every=10, **kw)
    assert len([w for w in caught if "state_dict" in str(w.message)]) == 1
    assert "3 batches of epoch 1" in str(caught[0].message)
    assert_weights_equal(straight, resumed)
    assert data.iters == 2  # the resumed epoch, replayed from its start, and the next


def test_iterable_dataset_with_len_is_batched_and_trains():
    data, model = StatelessSizedStream(), MLP()
    sizes: list[int] = []
    t = trainer(model, data, batch_size=BATCH, max_epochs=2,
                forward=lambda m, batch: sizes.append(len(batch[0])) or m(*batch))
    assert t.steps_per_epoch == 7  # ceil(50 / 8)
    t.fit()
    assert t.step == 14 and sizes == [8] * 6 + [2] + [8] * 6 + [2]
    assert data.iters == 2


def test_iterable_dataset_validates_in_batches():
    streamed = trainer(MLP(), make_data(N), val_data=SizedStream(), batch_size=BATCH, max_steps=1).validate()
    in_memory = trainer(MLP(), make_data(N), val_data=make_data(N), batch_size=BATCH, max_steps=1).validate()
    assert streamed["val/loss"] == pytest.approx(in_memory["val/loss"])  # the same items, batched


def test_stateful_dataloader_resumes_without_replay(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    x, y = make_data(N)

    def loader():
        return sdl.StatefulDataLoader(PairDataset(x, y), batch_size=BATCH)

    kw = dict(batch_size=BATCH, max_steps=12)  # the checkpoint of step 7 ends epoch 0
    straight = MLP()
    trainer(straight, loader(), **kw).fit()
    resumed, t, data = crash_and_resume(loader, tmp_path, crash=9, every=7, **kw)
    assert_weights_equal(straight, resumed)
    assert data.dataset.calls == 5 * BATCH  # the 5 steps after the checkpoint, nothing replayed
    saved = json.loads((tmp_path / "checkpoints" / "step-000000007" / "trainer.json").read_text())["data"]
    assert saved["iterable"]["_iterator_finished"]  # the epoch's iterator was run to its end


def test_shuffling_stateful_dataloader_resumes_through_its_tensor_state(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    x, y = make_data(N)

    def loader():  # its state holds the sampler's generator state, a tensor
        return sdl.StatefulDataLoader(PairDataset(x, y), batch_size=BATCH, shuffle=True)

    kw = dict(batch_size=BATCH, max_steps=12)
    straight = MLP()
    trainer(straight, loader(), **kw).fit()
    resumed, t, data = crash_and_resume(loader, tmp_path, crash=5, every=3, **kw)
    assert_weights_equal(straight, resumed)
    assert data.dataset.calls == (3 * BATCH + 2) + 5 * BATCH  # steps 4-7 (7: the last 2 items), 8-12: no replay


def test_stateful_iterable_dataset_with_workers_uses_a_stateful_loader(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    kw = dict(batch_size=BATCH, max_steps=6, num_workers=2)
    straight = MLP()
    trainer(straight, SizedStream(), **kw).fit()
    resumed, t, data = crash_and_resume(SizedStream, tmp_path, crash=4, every=2, **kw)
    assert_weights_equal(straight, resumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_second_fit_goes_on_where_the_first_stopped(workers):
    if workers:
        pytest.importorskip("torchdata.stateful_dataloader")
    kw = dict(batch_size=BATCH, num_workers=workers)
    straight = MLP()
    trainer(straight, SizedStream(), max_steps=8, **kw).fit()
    model = MLP()
    t = trainer(model, SizedStream(), max_steps=4, **kw)
    t.fit()
    assert multiprocessing.active_children() == []  # the loader's workers end with fit()
    t.max_steps = 8
    t.fit()
    assert_weights_equal(straight, model)
    assert multiprocessing.active_children() == []


def test_stateful_iterable_dataset_with_workers_needs_torchdata(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdata.stateful_dataloader", None)  # import fails
    with pytest.raises(ConfigError, match="num_workers.*StatefulDataLoader"):
        trainer(MLP(), Stream(), batch_size=BATCH, max_steps=1, num_workers=2)
