"""A word-level LSTM language model trained with truncated backprop through time, as pytorch/examples'
``word_language_model`` does: the hidden state is carried from one batch to the next (detached), reset at each
epoch start and kept apart from validation; the rate is divided by 4 when validation stops improving; a test
pass runs after training.

The hidden state lives in the model and is given to cadence through PyTorch's ``get_extra_state`` /
``set_extra_state``, so every checkpoint holds it and a killed run resumes bitwise.

    python examples/lstm_lm.py --run-dir runs/lstm [--resume] [--steps 120]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from cadence import Callback, Plateau, Trainer

VOCAB, STREAMS, BPTT = 50, 8, 12


def corpus(n_tokens: int, seed: int) -> torch.Tensor:
    """Tokens of a random Markov chain (each word has 3 likely successors): something an LSTM can learn."""
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    g.manual_seed(seed)
    tokens, word = [], 0
    for choice in torch.randint(0, 3, (n_tokens,), generator=g).tolist():
        word = int(successors[word, choice])
        tokens.append(word)
    return torch.tensor(tokens)


def batchify(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``STREAMS`` parallel streams cut into chunks of ``BPTT``: inputs and next-word targets, one chunk per
    item, in order (an item is ``(STREAMS, BPTT)``)."""
    per_stream = (len(tokens) - 1) // STREAMS
    x = tokens[:per_stream * STREAMS].view(STREAMS, per_stream)
    y = tokens[1:per_stream * STREAMS + 1].view(STREAMS, per_stream)
    chunks = per_stream // BPTT
    cut = lambda t: t[:, :chunks * BPTT].view(STREAMS, chunks, BPTT).transpose(0, 1).contiguous()
    return cut(x), cut(y)


class LSTMLM(nn.Module):
    def __init__(self, emb: int = 32, hidden: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        self.embed, self.drop = nn.Embedding(VOCAB, emb), nn.Dropout(dropout)
        self.rnn = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.squeeze(0), y.squeeze(0)  # one chunk per step: (STREAMS, BPTT)
        hidden = None if self.hidden is None else tuple(h.detach() for h in self.hidden)
        out, self.hidden = self.rnn(self.drop(self.embed(x)), hidden)
        return F.cross_entropy(self.head(self.drop(out)).flatten(0, 1), y.flatten())

    def get_extra_state(self) -> dict:
        return {"hidden": None if self.hidden is None else [h.detach() for h in self.hidden]}

    def set_extra_state(self, state: dict) -> None:
        self.hidden = None if state["hidden"] is None else tuple(state["hidden"])


class CarryHidden(Callback):
    """A fresh hidden state at each epoch start and for each validation; training's is kept across it."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        trainer.model.hidden = None

    def on_validation_start(self, trainer: Trainer) -> None:
        self.kept, trainer.model.hidden = trainer.model.hidden, None

    def on_validation_end(self, trainer: Trainer, metrics: dict) -> None:
        trainer.model.hidden = self.kept


def build(run_dir: str | None, steps: int = 120, resume: bool = False, **kw) -> Trainer:
    torch.manual_seed(0)
    return Trainer(LSTMLM(), batchify(corpus(4000, seed=1)), val_data=batchify(corpus(800, seed=2)),
                   batch_size=1, shuffle=False, max_steps=steps, lr=3e-3, max_grad_norm=0.25, val_every=20,
                   schedule="plateau", plateau=Plateau(monitor="val/loss", factor=0.25, patience=0),
                   callbacks=[CarryHidden(), *kw.pop("callbacks", [])], run_dir=run_dir,
                   checkpoint_every=10 if run_dir else None, resume="auto" if resume else None, **kw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    trainer = build(args.run_dir, args.steps, args.resume)
    trainer.fit()
    test = trainer.test(batchify(corpus(800, seed=3)))
    print(trainer.summary(), f"test_loss={test['test/loss']:.4f}")


if __name__ == "__main__":
    main()
