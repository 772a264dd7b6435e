"""meshgpt-pytorch's ``MeshTransformerTrainer`` as a cadence recipe: an autoregressive transformer over the face
codes of a frozen mesh autoencoder, conditioned on a text (here a shape label).

What the seed trainer did by hand, and where it went:

- ``get_adam_optimizer(..., filter_by_requires_grad=True)``: optimizers by name leave frozen parameters out;
  the autoencoder inside the model is frozen (``requires_grad_(False)``) and never changes;
- checkpoints that carry ``version`` and ``config``: every checkpoint folder has ``trainer.json`` (cadence and
  torch versions, step) and the run folder has ``config.yaml``, from which the model is rebuilt and
  ``cadence fit --resume RUN`` continues; ``load`` is ``--resume``;
- ``dataset.data_kwargs`` (``vertices, faces, face_edges, texts``): the dataset's ``inputs`` attribute;
- ``get_adam_optimizer``'s betas and eps: ``optimizer_options: {betas: [0.9, 0.99], eps: 1.0e-8}``;
- warm-up, scheduler and clipping of each param group (``OptimizerWithWarmupSchedule``): ``warmup_steps``,
  ``schedule``, ``max_grad_norm`` with ``clip_per_group: true``.

A trained autoencoder plugs in with ``--model.init_args.autoencoder_weights RUN/final/ema.safetensors`` (a run of
``examples/meshgpt_autoencoder.yaml``; loaded with ``cadence.load_weights``).

Run from the repository root::

    cadence fit --config examples/meshgpt_transformer.yaml
    python -m examples.meshgpt_transformer   # the same run, then prints its first and last loss
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cadence import load_weights
from examples.meshgpt_autoencoder import MeshAutoencoder, grid_mesh
from examples.run import run_recipe

CONFIG = Path(__file__).with_suffix(".yaml")


class LabelledMeshes(Dataset):
    """Synthetic meshes of ``rows x cols`` quads, each bent by the height field of its shape label (the "text"),
    with jittered vertices. Items are ``(vertices, faces, face_edges, texts)``; ``inputs`` names them."""

    inputs = ("vertices", "faces", "face_edges", "texts")

    def __init__(self, size: int = 512, num_shapes: int = 4, rows: int = 2, cols: int = 3, noise: float = 0.01,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        shapes = torch.rand(num_shapes, 3, generator=torch.Generator().manual_seed(1234)) * 1.2 - 0.6
        self.labels = torch.randint(0, num_shapes, (size,), generator=g)
        self.meshes = [grid_mesh(rows, cols, shapes[c], noise, g) for c in self.labels.tolist()]

    def __len__(self) -> int:
        return len(self.meshes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return (*self.meshes[i], self.labels[i])


class MeshTransformer(nn.Module):
    """A tiny MeshGPT transformer: a frozen ``MeshAutoencoder`` turns each mesh into a sequence of codes (three
    per face), and a causal transformer, started by the text's embedding, predicts each next code.

    ``forward(vertices, faces, face_edges, texts)`` returns the mean next-code cross-entropy.
    """

    def __init__(self, num_texts: int = 4, dim: int = 64, depth: int = 2, heads: int = 4, max_faces: int = 12,
                 codebook_size: int = 128, autoencoder_dim: int = 64, autoencoder_weights: str | None = None) -> None:
        super().__init__()
        self.autoencoder = MeshAutoencoder(dim=autoencoder_dim, codebook_size=codebook_size)
        if autoencoder_weights:
            load_weights(self.autoencoder, autoencoder_weights)
        self.autoencoder.requires_grad_(False)  # frozen: the optimizer leaves these parameters out
        self.code_embed = nn.Embedding(codebook_size, dim)
        self.text_embed = nn.Embedding(num_texts, dim)
        self.pos_embed = nn.Parameter(torch.randn(max_faces * 3, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.to_logits = nn.Linear(dim, codebook_size)

    def forward(self, vertices: torch.Tensor, faces: torch.Tensor, face_edges: torch.Tensor,
                texts: torch.Tensor) -> torch.Tensor:
        codes = self.autoencoder.tokenize(vertices, faces, face_edges)  # (B, L), no gradient
        x = torch.cat([self.text_embed(texts).unsqueeze(1), self.code_embed(codes[:, :-1])], 1)
        x = x + self.pos_embed[: x.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.transformer(x, mask=causal, is_causal=True)
        return F.cross_entropy(self.to_logits(h).flatten(0, 1), codes.flatten())


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.meshgpt_transformer [overrides]``: ``cadence fit`` on this recipe's YAML, then its
    first and last logged training loss. Overrides are ``cadence fit`` options (``--trainer.max_steps 50``)."""
    return run_recipe(CONFIG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
