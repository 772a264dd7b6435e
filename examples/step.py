"""STEP's ``Trainer`` (with ``EarlyStopping`` and ``category_random_split``) as a cadence recipe: a cell-expression
model with a reconstruction and a cell-type loss, trained in two stages.

What the seed trainer did by hand, and where it went:

- epoch-based training: ``max_epochs`` (validation at each epoch end);
- the loss (STEP's ``scSingleBatch.loss``): the model returns its parts and ``loss_weights`` sums them;
- ``EarlyStopping(patience, delta)`` per loss type (the ``lossconfig`` entries): one ``cadence.EarlyStopping(monitor:
  val/<part>, patience, min_delta)`` per part, ``stop_when`` choosing whether any or all of them must fire;
- ``MultiStepLR(milestones, gamma)``: ``schedule: multistep`` with ``milestones`` (in optimizer steps) and
  ``gamma`` (STEP's ``set_lr_scheduler`` does nothing, so its runs kept a constant rate; the recipe shows the
  documented schedule);
- ``init_optimizer(lr, tune_lr, stage, tune_batch_embedding)``: ``stages``, a list of ``Stage(epochs, trainable,
  lr, param_groups)``: first everything but the batch embedding trains, then the batch embedding is tuned at its
  own rate while the rest goes on at a lower one;
- ``category_random_split(dataset, split_rate, obs_key)``: ``valid_frac`` with ``split_by:
  examples.step.sample_of`` and ``split_mode: stratified`` (``valid_frac`` of every sample is held out).

Run from the repository root::

    cadence fit --config examples/step.yaml
    python -m examples.step               # the same run, then prints its first and last loss
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from examples.run import run_recipe

CONFIG = Path(__file__).with_suffix(".yaml")


class CellExpression(Dataset):
    """Synthetic single-cell expression: each cell is its cell type's expression profile, plus the technical
    shift of its sequencing batch, plus noise. Cells come from ``num_samples`` samples (the category that
    ``split_by`` stratifies by); sample ``s`` was sequenced in batch ``s % num_batches``.

    Items are ``(expression float (G,), cell_type long (), batch long (), sample long ())``.
    """

    def __init__(self, num_cells: int = 1500, num_genes: int = 64, num_cell_types: int = 6, num_samples: int = 15,
                 num_batches: int = 3, batch_effect: float = 1.0, noise: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        profiles = torch.randn(num_cell_types, num_genes, generator=g) * 1.5
        shifts = torch.randn(num_batches, num_genes, generator=g) * batch_effect
        self.cell_type = torch.randint(0, num_cell_types, (num_cells,), generator=g)
        self.sample = torch.randint(0, num_samples, (num_cells,), generator=g)
        self.batch = self.sample % num_batches
        self.x = profiles[self.cell_type] + shifts[self.batch] + noise * torch.randn(num_cells, num_genes, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.x[i], self.cell_type[i], self.batch[i], self.sample[i]


def sample_of(item: tuple[torch.Tensor, ...]) -> int:
    """The category ``split_by`` stratifies by (the seed's ``obs_key``): the sample a cell came from."""
    return int(item[3])


class TranscriptFormer(nn.Module):
    """A tiny stand-in for STEP's TranscriptFormer: an encoder to a cell embedding, a cell-type classifier on it,
    and a decoder that reconstructs the expression from the embedding plus a batch embedding.

    ``forward(x, cell_type, batch, sample)`` returns the parts ``recon`` (MSE), ``cls`` (cross-entropy) and ``acc``.
    """

    def __init__(self, num_genes: int = 64, num_cell_types: int = 6, num_batches: int = 3, hidden: int = 64,
                 latent: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(num_genes, hidden), nn.GELU(), nn.Linear(hidden, latent))
        self.classifier = nn.Linear(latent, num_cell_types)
        self.batch_embedding = nn.Embedding(num_batches, latent)
        nn.init.zeros_(self.batch_embedding.weight)  # no batch effect until it is tuned
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, num_genes))

    def forward(self, x: torch.Tensor, cell_type: torch.Tensor, batch: torch.Tensor,
                sample: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        logits = self.classifier(z)
        recon = self.decoder(z + self.batch_embedding(batch))
        return {
            "recon": F.mse_loss(recon, x),
            "cls": F.cross_entropy(logits, cell_type),
            "acc": (logits.argmax(-1) == cell_type).float().mean(),
        }


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.step [overrides]``: ``cadence fit`` on this recipe's YAML, then its first and last
    logged training loss. Overrides are ``cadence fit`` options (``--trainer.max_epochs 5``, ``--run-dir D``)."""
    return run_recipe(CONFIG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
