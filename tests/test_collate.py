"""Collation of variable-length items: pad_collate (pad to the longest, with a mask) and curtail_collate (cut to
the shortest), alone and as the Trainer's collate_fn."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from cadence import Trainer
from cadence.data import curtail_collate, pad_collate

pytestmark = pytest.mark.usefixtures("one_thread")


def seq(length: int, start: float = 1.0, dim: int | None = None) -> torch.Tensor:
    t = torch.arange(start, start + length, dtype=torch.float32)
    return t if dim is None else t[:, None].repeat(1, dim)


def test_pad_collate_tensor_items():
    items = [seq(3, dim=2), seq(1, 10.0, dim=2), seq(2, 20.0, dim=2)]
    padded, mask = pad_collate(items)
    assert padded.shape == (3, 3, 2)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    for i, item in enumerate(items):
        n = len(item)
        assert torch.equal(padded[i, :n], item)
        assert (padded[i, n:] == 0).all()
    padded, _ = pad_collate(items, value=-1.0)
    assert padded[1, 1:].eq(-1).all() and padded[2, 2:].eq(-1).all()
    custom = functools.partial(pad_collate, value=-1.0)  # how to pass a padding value as collate_fn
    assert torch.equal(custom(items)[0], padded)


def test_pad_collate_tuple_items():
    items = [(seq(2), torch.tensor(1), 0.5), (seq(4, 5.0), torch.tensor(0), 1.5)]
    wavs, labels, weights, mask = pad_collate(items)
    assert torch.equal(wavs, torch.tensor([[1.0, 2.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0]]))
    assert torch.equal(labels, torch.tensor([1, 0]))
    assert torch.equal(weights, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    # two fields with a length: both padded, one mask appended, for the first of them
    wavs, texts, mask = pad_collate([(seq(2), torch.tensor([1, 2, 3])), (seq(2, 5.0), torch.tensor([4]))])
    assert wavs.shape == (2, 2) and torch.equal(texts, torch.tensor([[1, 2, 3], [4, 0, 0]]))
    assert mask.all() and mask.shape == (2, 2)


def test_pad_collate_dict_items():
    items = [{"wav": seq(3), "text": torch.tensor([4, 5]), "id": 7},
             {"wav": seq(1), "text": torch.tensor([6, 7, 8]), "id": 9}]
    out = pad_collate(items)
    assert set(out) == {"wav", "wav_mask", "text", "text_mask", "id"}
    assert torch.equal(out["wav"], torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]))
    assert out["wav_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(out["text"], torch.tensor([[4, 5, 0], [6, 7, 8]]))
    assert out["text"].dtype == torch.int64
    assert out["text_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(out["id"], torch.tensor([7, 9]))


def test_curtail_collate_cuts_to_the_shortest():
    items = [seq(3, dim=2), seq(1, 10.0, dim=2), seq(2, 20.0, dim=2)]
    assert torch.equal(curtail_collate(items), torch.stack([item[:1] for item in items]))
    wavs, labels = curtail_collate([(seq(2), 1), (seq(4, 5.0), 0)])
    assert torch.equal(wavs, torch.tensor([[1.0, 2.0], [5.0, 6.0]])) and torch.equal(labels, torch.tensor([1, 0]))
    out = curtail_collate([{"wav": seq(3), "text": torch.tensor([4, 5])},
                           {"wav": seq(5), "text": torch.tensor([6, 7, 8])}])
    assert torch.equal(out["wav"], torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert torch.equal(out["text"], torch.tensor([[4, 5], [6, 7]]))


# ------------------------------------------------------------------------------------------------ in the Trainer
LENGTHS = [3, 5, 2, 7, 4, 6, 1, 8, 5, 3, 6, 2]


class Clips(Dataset):
    """Variable-length 1-d clips and a label each."""

    def __init__(self, lengths: list[int] = LENGTHS) -> None:
        g = torch.Generator().manual_seed(0)
        self.clips = [torch.randn(n, generator=g) for n in lengths]
        self.labels = [float(c.sum() > 0) for c in self.clips]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        return self.clips[i], self.labels[i]


class MaskedMean(nn.Module):
    """Scores the mean of each clip's real positions; records the batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.batches: list[tuple[Any, ...]] = []

    def forward(self, clips: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.batches.append((clips, labels, mask))
        mask = torch.ones_like(clips, dtype=torch.bool) if mask is None else mask
        mean = (clips * mask).sum(1) / mask.sum(1)
        return nn.functional.binary_cross_entropy_with_logits(self.scale * mean, labels.float())


def fit(collate_fn: Any, **kw: Any) -> tuple[MaskedMean, Trainer]:
    model = MaskedMean()
    t = Trainer(model, Clips(), val_data=Clips(LENGTHS[:5]), collate_fn=collate_fn, batch_size=4, max_steps=6,
                lr=0.1, device="cpu", progress=False, **kw)
    t.fit()
    return model, t


def train_batches(model: MaskedMean) -> list[tuple[list[int], tuple[Any, ...]]]:
    """The training batches with the item indices the data order contract gives them (12 items, batch 4: 3 steps
    per epoch; the epoch-end validation's 2 batches come after step 3)."""
    perms = [torch.randperm(12, generator=torch.Generator().manual_seed(e)) for e in (0, 1)]
    train = model.batches[:3] + model.batches[5:8]
    return [(perms[step // 3][(step % 3) * 4:(step % 3 + 1) * 4].tolist(), batch) for step, batch in enumerate(train)]


def test_pad_collate_as_the_trainers_collate_fn():
    model, t = fit(pad_collate)
    assert len(model.batches) == 6 + 2 * 2
    data = Clips()
    for idx, (clips, labels, mask) in train_batches(model):
        longest = max(LENGTHS[i] for i in idx)
        assert clips.shape == (4, longest) and mask is not None
        for row, i in enumerate(idx):
            n = LENGTHS[i]
            assert torch.equal(clips[row, :n], data.clips[i]) and not clips[row, n:].any()
            assert mask[row].tolist() == [True] * n + [False] * (longest - n)
        assert labels.tolist() == [data.labels[i] for i in idx]
    assert len(t.history["val/loss"]) == 2  # validation collates with it too


def test_curtail_collate_as_the_trainers_collate_fn():
    model, _ = fit(curtail_collate)
    data = Clips()
    for idx, (clips, _, mask) in train_batches(model):
        shortest = min(LENGTHS[i] for i in idx)
        assert mask is None and clips.shape == (4, shortest)
        assert torch.equal(clips, torch.stack([data.clips[i][:shortest] for i in idx]))


@pytest.mark.parametrize("items", [
    [seq(3)],
    [(seq(3), 1), (seq(3, 5.0), 0)],
    [{"wav": seq(2)}, {"wav": seq(2, 4.0)}],
], ids=["tensor", "tuple", "dict"])
def test_pad_collate_always_gives_the_mask(items):
    """Equal lengths (or a single item) give the same structure as different ones: every batch has one shape."""
    out = pad_collate(items)
    if isinstance(items[0], dict):
        assert out["wav_mask"].all()
    else:
        assert isinstance(out, tuple) and out[-1].dtype == torch.bool and out[-1].all()


def test_a_last_batch_of_one_item_still_gets_its_mask():
    """9 items in batches of 4 end with a batch of one item, which still comes with its mask."""
    class NeedsMask(MaskedMean):
        def forward(self, clips: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(clips, labels, mask)

    model = NeedsMask()
    Trainer(model, Clips(LENGTHS[:9]), collate_fn=pad_collate, batch_size=4, max_steps=3, device="cpu",
            progress=False).fit()
    assert [len(clips) for clips, _, _ in model.batches] == [4, 4, 1]
    clips, _, mask = model.batches[-1]
    assert mask.dtype == torch.bool and mask.shape == clips.shape and mask.all()


def test_pad_collate_with_a_value_from_a_config() -> None:
    """``collate_fn: {class_path: cadence.data.PadCollate, init_args: {value: -1}}``: meshgpt's pad id."""
    from cadence.data import PadCollate, pad_collate

    items = [{"faces": torch.ones(2, 3)}, {"faces": torch.ones(4, 3)}]
    by_class, by_function = PadCollate(-1)(items), pad_collate(items, value=-1)
    assert torch.equal(by_class["faces"], by_function["faces"]) and by_class["faces"][0, 2:].eq(-1).all()
