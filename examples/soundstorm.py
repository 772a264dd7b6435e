"""soundstorm-pytorch's ``SoundStormTrainer`` as a cadence recipe: masked acoustic-token generation with a
token critic, conditioned on semantic tokens.

What the seed trainer did by hand, and where it went:

- linear warm-up from ``initial_lr`` to ``lr`` over ``num_warmup_steps``, then cosine annealing:
  ``warmup_steps``, ``warmup_start_lr``, ``schedule: cosine`` (a pure function of the step, so nothing to save);
- the loss with named parts: the model returns ``(loss, LossBreakdown(generator_loss, critic_loss))``, a
  NamedTuple, as soundstorm's; both parts are logged by their field names, in training and validation;
- ``only_train_generator`` / ``only_train_critic``, passed by the seed to every training call (not to
  validation calls): ``forward_kwargs`` with ``val_forward_kwargs: {}``;
- validation every ``save_results_every`` steps, at step 0 too, on ``random_split`` with a seed: ``val_every``,
  ``val_at_start: true``, ``valid_frac``, ``split_mode: torch``, ``split_seed``;
- the step number recovered from the checkpoint's file name on resume: cadence stores the step in the
  checkpoint itself (``cadence fit --resume RUN``).

Run from the repository root::

    cadence fit --config examples/soundstorm.yaml
    python -m examples.soundstorm         # the same run, then prints its first and last loss
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from examples.run import run_recipe

CONFIG = Path(__file__).with_suffix(".yaml")


class SemanticAcousticPairs(Dataset):
    """Synthetic token pairs: ``semantic (N,)`` tokens and the ``acoustic (N, Q)`` tokens of ``Q`` quantizers that
    a fixed, position-wise rule derives from them (plus a little noise), so the acoustic tokens are predictable
    from the semantic ones. Items are ``(semantic long (N,), acoustic long (N, Q))``."""

    def __init__(self, size: int = 1024, length: int = 16, num_semantic: int = 32, codebook_size: int = 32,
                 num_quantizers: int = 4, noise: float = 0.05, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        rule = torch.randint(0, codebook_size, (num_semantic, num_quantizers),
                             generator=torch.Generator().manual_seed(1234))  # the same rule for every split
        self.semantic = torch.randint(0, num_semantic, (size, length), generator=g)
        self.acoustic = rule[self.semantic]  # (size, N, Q)
        flip = torch.rand(self.acoustic.shape, generator=g) < noise
        self.acoustic[flip] = torch.randint(0, codebook_size, (int(flip.sum()),), generator=g)

    def __len__(self) -> int:
        return len(self.semantic)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.semantic[i], self.acoustic[i]


class LossBreakdown(NamedTuple):
    """soundstorm's loss parts; ``critic_loss`` is None when the critic is not trained in that call."""

    generator_loss: torch.Tensor
    critic_loss: torch.Tensor | None


class SoundStorm(nn.Module):
    """A tiny SoundStorm: a random share of the acoustic tokens is masked and predicted from the semantic tokens
    and the unmasked ones (the generator); a token critic then tells the generator's sampled tokens from the
    true ones (the critic). ``forward(..., only_train_generator=False, only_train_critic=False)`` returns
    ``(loss, LossBreakdown(generator_loss, critic_loss))``, as soundstorm's.
    """

    def __init__(self, num_semantic: int = 32, codebook_size: int = 32, num_quantizers: int = 4, dim: int = 64,
                 length: int = 16, critic_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.q, self.codebook_size = num_quantizers, codebook_size
        self.critic_loss_weight = critic_loss_weight
        self.semantic_embed = nn.Embedding(num_semantic, dim)
        self.pos_embed = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.acoustic_embed = nn.Embedding(num_quantizers * (codebook_size + 1), dim)  # + a mask token each
        self.generator = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.GELU())
        self.mix = nn.Conv1d(dim, dim, 3, padding=1)
        self.to_logits = nn.Linear(dim, num_quantizers * codebook_size)
        self.critic = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def embed_acoustic(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, Q)`` tokens (``codebook_size`` is the mask token) summed over quantizers: ``(B, N, dim)``."""
        offsets = torch.arange(self.q, device=tokens.device) * (self.codebook_size + 1)
        return self.acoustic_embed(tokens + offsets).sum(2)

    def forward(self, cond_semantic_token_ids: torch.Tensor, acoustic_token_ids: torch.Tensor,
                only_train_generator: bool = False,
                only_train_critic: bool = False) -> tuple[torch.Tensor, LossBreakdown]:
        if only_train_generator and only_train_critic:
            raise ValueError("only_train_generator and only_train_critic cannot both be True")
        b, n, q = acoustic_token_ids.shape
        ratio = torch.rand(b, 1, 1, device=acoustic_token_ids.device).clamp(min=0.1)
        mask = torch.rand(b, n, q, device=acoustic_token_ids.device) < ratio
        masked = acoustic_token_ids.masked_fill(mask, self.codebook_size)
        cond = self.semantic_embed(cond_semantic_token_ids) + self.pos_embed[:n]
        h = self.generator(cond + self.embed_acoustic(masked))
        h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
        logits = self.to_logits(h).view(b, n, q, self.codebook_size)
        generator_loss = F.cross_entropy(logits[mask], acoustic_token_ids[mask]) if mask.any() else logits.sum() * 0
        if only_train_generator:  # the critic is not run: its part is None, as soundstorm's
            return generator_loss, LossBreakdown(generator_loss, None)

        with torch.no_grad():  # the critic judges the generator's samples, filled into the masked places
            sampled = torch.distributions.Categorical(logits=logits.float()).sample()
            filled = torch.where(mask, sampled, acoustic_token_ids)
            wrong = (filled != acoustic_token_ids).float()
        offsets = torch.arange(q, device=filled.device) * (self.codebook_size + 1)
        tokens = self.acoustic_embed(filled + offsets)  # (B, N, Q, dim): each token judged on its own
        critic_in = torch.cat([cond.unsqueeze(2).expand_as(tokens), tokens], -1)
        critic_logits = self.critic(critic_in).squeeze(-1)
        critic_loss = F.binary_cross_entropy_with_logits(critic_logits, wrong)

        loss = critic_loss if only_train_critic else generator_loss + self.critic_loss_weight * critic_loss
        return loss, LossBreakdown(generator_loss, critic_loss)


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.soundstorm [overrides]``: ``cadence fit`` on this recipe's YAML, then its first and
    last logged training loss. Overrides are ``cadence fit`` options (``--trainer.max_steps 50``, ``--run-dir D``)."""
    return run_recipe(CONFIG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
