"""tf-bind-transformer's ``Trainer`` as a cadence recipe: does a transcription factor bind this DNA window?

What the seed trainer did by hand, and where it went:

- positives, negatives and scoped negatives drawn together every step: ``train_data`` is a dict of three
  sources (``peak_sources`` below) and ``mix: each`` takes a batch from every one per step; their losses are
  logged as ``pos/...``, ``neg/...``, ``scoped_neg/...``;
- ``model.combine_losses(loss, aux_loss)``: the model returns its parts and ``loss_weights`` sums them;
- held-out chromosomes for validation: ``val_data`` is built from other chromosomes (several sources cannot be
  split by ``valid_frac``/``split_by``, so held-out groups are named the way the seed named them);
- ``balance_sampling_by_target``: ``sampler: balanced`` with ``balance_by: examples.tf_bind.target_of``;
- validation accuracy: the model returns ``acc`` as a part, so it is logged as ``val/acc``;
- ``finetune_enformer_ln_only`` passed to every training call: ``forward_kwargs`` (here ``false``: this recipe's
  trunk starts untrained, where the seed's Enformer came pretrained), not to validation calls:
  ``val_forward_kwargs: {}``;
- validation at step 0 too (``curr_step % validate_every == 0``): ``val_at_start: true``.

Run from the repository root::

    cadence fit --config examples/tf_bind.yaml
    python -m examples.tf_bind            # the same run, then prints its first and last loss
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from examples.run import run_recipe

CONFIG = Path(__file__).with_suffix(".yaml")
BASES = 4  # A C G T as 0 1 2 3


def motifs(num_tfs: int, length: int, seed: int = 1234) -> torch.Tensor:
    """Each factor's binding motif: ``(num_tfs, length)`` bases, the same for every dataset (fixed seed)."""
    return torch.randint(0, BASES, (num_tfs, length), generator=torch.Generator().manual_seed(seed))


class Peaks(Dataset):
    """Synthetic peaks: DNA windows of ``context_length`` bases, each paired with a transcription factor.

    ``kind="pos"``: the factor's motif is planted once or twice (bound, label 1, read value = copies);
    ``"neg"``: random sequence (label 0); ``"scoped_neg"``: another factor's motif is planted (label 0: the
    context has a peak, but not for this factor); ``"mixed"``: positives and negatives alternately (validation).
    Chromosomes are the held-out groups: each chromosome's windows come from their own seeded generator, so
    train and validation chromosomes never share a window. Factors are imbalanced on purpose (factor ``t`` is
    ``1 / (t + 1)`` as frequent), which balanced sampling evens out.

    Items are tuples ``(seq long (L,), tf long (), target float (), read_value float ())``.
    """

    def __init__(self, kind: str = "pos", chromosomes: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
                 per_chromosome: int = 64, context_length: int = 32, num_tfs: int = 6, motif_length: int = 6,
                 seed: int = 0) -> None:
        if kind not in ("pos", "neg", "scoped_neg", "mixed"):
            raise ValueError(f"kind={kind!r}: use 'pos', 'neg', 'scoped_neg' or 'mixed'")
        self.kind = kind
        table = motifs(num_tfs, motif_length)
        freq = 1.0 / torch.arange(1, num_tfs + 1, dtype=torch.float64)
        seqs, tfs, targets, reads = [], [], [], []
        for chrom in chromosomes:
            g = torch.Generator().manual_seed(seed * 100_003 + int(chrom) * 7 + ("pos", "neg", "scoped_neg",
                                                                                  "mixed").index(kind))
            for i in range(per_chromosome):
                tf = int(torch.multinomial(freq, 1, generator=g))
                seq = torch.randint(0, BASES, (context_length,), generator=g)
                item_kind = kind if kind != "mixed" else ("pos", "neg")[i % 2]
                copies = 0
                if item_kind == "pos":
                    copies = 1 + int(torch.randint(0, 2, (), generator=g))
                    self._plant(seq, table[tf], copies, g)
                elif item_kind == "scoped_neg":
                    other = (tf + 1 + int(torch.randint(0, num_tfs - 1, (), generator=g))) % num_tfs
                    self._plant(seq, table[other], 1, g)
                seqs.append(seq)
                tfs.append(tf)
                targets.append(float(item_kind == "pos"))
                reads.append(float(copies))
        self.seq = torch.stack(seqs)
        self.tf = torch.tensor(tfs)
        self.target = torch.tensor(targets)
        self.read_value = torch.tensor(reads)

    @staticmethod
    def _plant(seq: torch.Tensor, motif: torch.Tensor, copies: int, g: torch.Generator) -> None:
        span = len(seq) // copies
        for c in range(copies):
            at = c * span + int(torch.randint(0, span - len(motif) + 1, (), generator=g))
            seq[at: at + len(motif)] = motif

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.seq[i], self.tf[i], self.target[i], self.read_value[i]


def peak_sources(chromosomes: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), per_chromosome: int = 64,
                 context_length: int = 32, num_tfs: int = 6, include_scoped_negs: bool = True,
                 seed: int = 0) -> dict[str, Peaks]:
    """The training sources, drawn from together each step: ``{"pos", "neg"[, "scoped_neg"]}``."""
    kinds = ["pos", "neg"] + (["scoped_neg"] if include_scoped_negs else [])
    return {k: Peaks(k, chromosomes, per_chromosome, context_length, num_tfs, seed=seed) for k in kinds}


def target_of(item: tuple[torch.Tensor, ...]) -> int:
    """The label balanced sampling evens out: the transcription factor of an item."""
    return int(item[1])


class TfBind(nn.Module):
    """A motif scanner conditioned on the factor: a convolution over the one-hot window, matched against the
    factor's embedding (the seed's protein embedding) at every position, max-pooled to a binding logit.

    ``forward(seq, tf, target, read_value)`` returns the seed's loss parts: ``bce`` (the main binary loss),
    ``aux`` (the read-value regression, seed ``read_value_aux_loss``) and ``acc`` (no gradient). The YAML's
    ``loss_weights`` combines ``bce`` and ``aux`` (the seed's ``combine_losses``). The call flag
    ``finetune_enformer_ln_only`` (the seed passed it to every training call) leaves the sequence trunk, the
    seed's pretrained Enformer, untrained in that call (the seed then tunes only the Enformer's layer norms;
    this trunk has none).
    """

    def __init__(self, num_tfs: int = 6, dim: int = 32, kernel: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv1d(BASES, dim, kernel)
        self.tf_embed = nn.Embedding(num_tfs, dim)
        self.scale = nn.Linear(1, 1)
        self.read_head = nn.Linear(2, 1)

    def logits(self, seq: torch.Tensor, tf: torch.Tensor,
               freeze_trunk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad() if freeze_trunk else contextlib.nullcontext():  # the seed's Enformer
            h = F.relu(self.conv(F.one_hot(seq, BASES).float().transpose(1, 2)))  # (B, dim, L')
        match = torch.einsum("bdl,bd->bl", h, self.tf_embed(tf)) / h.shape[1] ** 0.5
        best = match.amax(dim=1, keepdim=True)
        logit = self.scale(best).squeeze(1)
        read = self.read_head(torch.cat([best, F.relu(match).mean(1, keepdim=True)], 1)).squeeze(1)
        return logit, read

    def forward(self, seq: torch.Tensor, tf: torch.Tensor, target: torch.Tensor, read_value: torch.Tensor,
                finetune_enformer_ln_only: bool = False) -> dict[str, torch.Tensor]:
        logit, read = self.logits(seq, tf, freeze_trunk=finetune_enformer_ln_only)
        return {
            "bce": F.binary_cross_entropy_with_logits(logit, target),
            "aux": F.mse_loss(read, read_value),
            "acc": ((logit > 0).float() == target).float().mean(),
        }


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.tf_bind [overrides]``: ``cadence fit`` on this recipe's YAML, then its first and last
    logged training loss. Overrides are ``cadence fit`` options (``--trainer.max_steps 50``, ``--run-dir D``)."""
    return run_recipe(CONFIG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
