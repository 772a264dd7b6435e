"""meshgpt-pytorch's ``MeshAutoencoderTrainer`` as a cadence recipe: a face autoencoder with a vector-quantized
bottleneck, validated on the EMA of its weights.

What the seed trainer did by hand, and where it went:

- ``EMA(model, **ema_kwargs)`` updated after every step, validation on the EMA model: ``ema: {class_path:
  cadence.EMA, ...}`` and ``validate_on: ema`` (``cadence export RUN --ema`` writes the EMA weights);
- ``total_loss, (recon_loss, commit_loss) = model(..., return_loss_breakdown=True)``: the model returns that
  tuple, as meshgpt's does; ``forward_kwargs: {return_loss_breakdown: true}`` passes the flag to every call
  (validation too) and ``part_names: [recon, commit]`` names the parts, logged for training and validation;
- ``get_adam_optimizer(betas=(0.9, 0.99))``: ``optimizer: adam`` with ``optimizer_options: {betas: [0.9, 0.99]}``;
- ``OptimizerWithWarmupSchedule`` (warm-up, scheduler, clipping of each param group): ``warmup_steps``,
  ``schedule``, ``max_grad_norm`` with ``clip_per_group: true``; ``accelerator.autocast()``: ``precision: bf16``;
  ``no_sync`` during accumulation: done by cadence under DDP;
- ``dataset.data_kwargs`` naming the tuple's fields as forward keywords: the dataset's ``inputs`` attribute;
- ``custom_collate(pad_id=model.pad_id)``: ``collate_fn: examples.meshgpt_autoencoder.mesh_collate``, which is
  ``cadence.data.pad_collate`` with the pad value ``-1``.

Run from the repository root::

    cadence fit --config examples/meshgpt_autoencoder.yaml
    python -m examples.meshgpt_autoencoder   # the same run, then prints its first and last loss
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cadence.data import pad_collate
from examples.run import run_recipe

CONFIG = Path(__file__).with_suffix(".yaml")
PAD_ID = -1  # the seed's model.pad_id: padded faces, edges and vertices hold -1


def grid_mesh(rows: int, cols: int, shape: torch.Tensor, noise: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A triangulated height-field patch: ``(vertices (V, 3), faces (F, 3), face_edges (E, 2))``.

    ``shape`` holds the coefficients of the height ``z = a x^2 + b y^2 + c x y``; ``face_edges`` lists, in both
    directions, the pairs of faces that share an edge (what the seed derives from the faces).
    """
    ys, xs = torch.meshgrid(torch.linspace(-0.8, 0.8, rows + 1), torch.linspace(-0.8, 0.8, cols + 1), indexing="ij")
    x, y = xs.flatten(), ys.flatten()
    z = shape[0] * x**2 + shape[1] * y**2 + shape[2] * x * y
    vertices = torch.stack([x, y, z], 1) + noise * torch.randn(len(x), 3, generator=g)
    faces = []
    for r in range(rows):
        for c in range(cols):
            a, b = r * (cols + 1) + c, r * (cols + 1) + c + 1
            d, e = a + cols + 1, b + cols + 1
            faces += [(a, b, e), (a, e, d)]
    faces_t = torch.tensor(faces)
    by_edge: dict[tuple[int, int], list[int]] = {}
    for f, (i, j, k) in enumerate(faces):
        for edge in ((i, j), (j, k), (k, i)):
            by_edge.setdefault(tuple(sorted(edge)), []).append(f)
    pairs = [(p[0], p[1]) for p in by_edge.values() if len(p) == 2]
    edges = torch.tensor(pairs + [(b, a) for a, b in pairs])
    return vertices.clamp(-1, 1), faces_t, edges


class Meshes(Dataset):
    """Synthetic meshes: grid patches of ``2-3 x 2-4`` quads (8 to 24 faces) bent by one of ``num_shapes`` height
    fields, with jittered vertices. Items are ``(vertices, faces, face_edges)`` of different lengths; ``inputs``
    names them as the model's forward keywords (the seed's ``dataset.data_kwargs``)."""

    inputs = ("vertices", "faces", "face_edges")

    def __init__(self, size: int = 512, num_shapes: int = 4, noise: float = 0.02, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        shapes = torch.rand(num_shapes, 3, generator=torch.Generator().manual_seed(1234)) * 1.2 - 0.6
        self.items = []
        for _ in range(size):
            rows = int(torch.randint(2, 4, (), generator=g))
            cols = int(torch.randint(2, 5, (), generator=g))
            shape = shapes[int(torch.randint(0, num_shapes, (), generator=g))]
            self.items.append(grid_mesh(rows, cols, shape, noise, g))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.items[i]


def mesh_collate(batch: list) -> Any:
    """The seed's ``custom_collate(pad_id=-1)``: pad every field to the longest with ``-1``."""
    return pad_collate(batch, value=PAD_ID)


class ResidualVQ(nn.Module):
    """``depth`` codebooks, each quantizing what the previous ones left; straight-through gradients. The commit
    loss is the commitment term plus the codebook term (both squared distances)."""

    def __init__(self, dim: int, codebook_size: int, depth: int = 2) -> None:
        super().__init__()
        self.codebooks = nn.Parameter(torch.randn(depth, codebook_size, dim) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        residual, quantized, codes, commit = x, torch.zeros_like(x), [], x.new_zeros(x.shape[:-1])
        for book in self.codebooks:
            r = residual.detach()
            index = (book.pow(2).sum(-1) - 2 * r @ book.t()).argmin(-1)  # nearest code (|r|^2 is constant)
            q = book[index]
            commit = commit + (residual - q.detach()).pow(2).mean(-1) + (q - residual.detach()).pow(2).mean(-1)
            quantized = quantized + q
            residual = residual - q.detach()
            codes.append(index)
        return x + (quantized - x).detach(), torch.stack(codes, -1), commit


class MeshAutoencoder(nn.Module):
    """A tiny MeshGPT autoencoder: each face's three vertices, discretized, are embedded, mixed with the faces
    that share an edge with it (``face_edges``), and quantized per vertex by a residual VQ; the decoder predicts
    the nine discretized coordinates back.

    ``forward(vertices, faces, face_edges)`` returns ``loss = recon + commit_loss_weight * commit``; with
    ``return_loss_breakdown=True``, ``(loss, (recon, commit))`` as meshgpt's; padded faces (``-1``) count for
    nothing.
    """

    pad_id = PAD_ID

    def __init__(self, num_discrete_coors: int = 32, dim: int = 64, codebook_size: int = 128,
                 quantizer_depth: int = 2, commit_loss_weight: float = 0.25) -> None:
        super().__init__()
        self.bins, self.commit_loss_weight = num_discrete_coors, commit_loss_weight
        self.coor_embed = nn.Embedding(num_discrete_coors, 16)
        self.encode_faces = nn.Sequential(nn.Linear(9 * 16, dim), nn.GELU(), nn.Linear(dim, dim))
        self.neighbors = nn.Linear(dim, dim)
        self.to_vertices = nn.Linear(dim, 3 * dim)
        self.quantize = ResidualVQ(dim, codebook_size, quantizer_depth)
        self.decode = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 9 * num_discrete_coors))

    def discretize(self, coords: torch.Tensor) -> torch.Tensor:
        return ((coords + 1) / 2 * (self.bins - 1)).round().long().clamp(0, self.bins - 1)

    def encode(self, vertices: torch.Tensor, faces: torch.Tensor,
               face_edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(per-vertex features (B, F, 3, dim), discretized coordinates (B, F, 9), face mask (B, F))``."""
        b, f, _ = faces.shape
        face_mask = faces[..., 0] != self.pad_id
        index = faces.clamp(min=0)
        coords = torch.gather(vertices.unsqueeze(1).expand(b, f, -1, 3), 2,
                              index.unsqueeze(-1).expand(b, f, 3, 3))  # (B, F, 3 vertices, 3)
        target = self.discretize(coords).flatten(2)  # (B, F, 9)
        h = self.encode_faces(self.coor_embed(target).flatten(2))  # (B, F, dim)

        valid = face_edges[..., 0] != self.pad_id  # mean of the neighbours' features, over real edges only
        offset = (torch.arange(b, device=faces.device) * f).unsqueeze(1)
        src, dst = (face_edges[..., 0] + offset)[valid], (face_edges[..., 1] + offset)[valid]
        flat = h.reshape(b * f, -1)
        summed = torch.zeros_like(flat).index_add(0, dst, flat[src])
        degree = torch.zeros(b * f, device=h.device).index_add(0, dst, torch.ones_like(dst, dtype=h.dtype))
        h = h + self.neighbors(summed / degree.clamp(min=1).unsqueeze(1)).view(b, f, -1)
        per_vertex = torch.tanh(self.to_vertices(F.gelu(h))).view(b, f, 3, -1)  # bounded, like the codes
        return per_vertex, target, face_mask

    @torch.no_grad()
    def tokenize(self, vertices: torch.Tensor, faces: torch.Tensor, face_edges: torch.Tensor) -> torch.Tensor:
        """The first codebook's code of every vertex of every face: ``(B, F * 3)``."""
        per_vertex, _, _ = self.encode(vertices, faces, face_edges)
        return self.quantize(per_vertex)[1][..., 0].flatten(1)

    def forward(self, vertices: torch.Tensor, faces: torch.Tensor, face_edges: torch.Tensor,
                return_loss_breakdown: bool = False) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        per_vertex, target, face_mask = self.encode(vertices, faces, face_edges)
        b, f, _ = target.shape
        quantized, _, commit = self.quantize(per_vertex)
        logits = self.decode(quantized.flatten(2)).view(b, f, 9, self.bins)
        recon = F.cross_entropy(logits[face_mask].flatten(0, 1), target[face_mask].flatten())
        commit = commit.mean(-1)[face_mask].mean()
        loss = recon + self.commit_loss_weight * commit
        return (loss, (recon, commit)) if return_loss_breakdown else loss


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.meshgpt_autoencoder [overrides]``: ``cadence fit`` on this recipe's YAML, then its
    first and last logged training loss. Overrides are ``cadence fit`` options (``--trainer.max_steps 50``)."""
    return run_recipe(CONFIG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
