"""Hugging Face models and data: a tiny randomly initialised ``transformers`` model (no download) trains as a
hand-written loop on ``model(**batch).loss`` does; a ``datasets.Dataset`` (in memory or from a local file) is a
map-style dataset whose columns are keyword arguments; a streaming ``datasets.IterableDataset`` resumes exactly."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, even by mistake

import pytest
import torch

from helpers import MLP, CrashAt, assert_weights_close, assert_weights_equal, epoch_perm, make_data, trainer

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH, N = 64, 12, 40


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=LENGTH,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def token_rows() -> list[list[int]]:
    return torch.randint(0, VOCAB, (N, LENGTH), generator=torch.Generator().manual_seed(1)).tolist()


def test_transformers_model_on_a_dataset_trains_as_a_hand_written_loop():
    rows = token_rows()
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows, "text": ["unused"] * N})
    model = tiny_gpt2()
    start = copy.deepcopy(model)
    t = trainer(model, data, val_data=data.select(range(8)), inputs=["input_ids", "labels"], batch_size=8,
                max_steps=3, lr=0.05, optimizer="sgd", log_every=1)
    history = t.fit()
    assert len(history["train/loss"]) == 3 and history["val/loss"]
    assert all(set(r.get("parts", {})) == set() for r in history)  # logits and the cache are not parts
    ref, ids = start, torch.tensor(rows)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref.train()
    for step in range(3):
        index = epoch_perm(N, 0, 0)[step * 8:(step + 1) * 8]
        ref(input_ids=ids[index], labels=ids[index]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert_weights_close(model, ref)


def test_dataset_from_a_local_file_routes_its_columns(tmp_path):
    rows = token_rows()
    path = tmp_path / "tokens.jsonl"
    path.write_text("".join(json.dumps({"input_ids": r, "labels": r}) + "\n" for r in rows))
    data = datasets.Dataset.from_json(str(path))
    seen: list[set[str]] = []
    model = tiny_gpt2()

    def forward(m, batch):
        seen.append(set(batch))
        return m(**batch)

    trainer(model, data, batch_size=8, max_steps=2, forward=forward).fit()
    assert seen == [{"input_ids", "labels"}] * 2
    data.set_format("torch")  # a format set by the user is kept
    trainer(tiny_gpt2(), data, batch_size=8, max_steps=2).fit()


def test_streaming_dataset_resumes_without_replay(tmp_path):
    x, y = make_data(50)

    def stream():
        return datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist()}).to_iterable_dataset()

    kw = dict(batch_size=8, max_steps=10, inputs=["x", "y"])  # 7 steps per epoch: the resume crosses one
    straight = MLP()
    trainer(straight, stream(), **kw).fit()
    try:
        trainer(MLP(), stream(), run_dir=tmp_path, checkpoint_every=3, callbacks=[CrashAt(5)], **kw).fit()
    except RuntimeError:
        pass
    resumed = MLP()
    trainer(resumed, stream(), run_dir=tmp_path, resume="auto", **kw).fit()
    assert_weights_equal(straight, resumed)
