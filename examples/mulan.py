"""musiclm-pytorch's ``MuLaNTrainer`` as a cadence recipe: contrastive audio-text training.

What the seed trainer did by hand, and where it went:

- contrastive loss, ``batch_size > 1`` required: the model refuses a batch of one, and ``drop_last: true``
  keeps the last partial batch of an epoch from ever being that small;
- batch fields routed to forward keywords by their type (``wavs``, ``texts``): ``inputs: [wavs, texts]`` names
  the fields of each tuple batch;
- Adam or Lion (``use_lion``) with ``betas``: ``optimizer: lion`` (or ``adam``) with ``optimizer_options:
  {betas: [0.9, 0.99]}``;
- ``random_split`` with a seed: ``valid_frac``, ``split_mode: torch`` and ``split_seed``;
- ``pad_to_longest=False`` (curtail to the shortest) or ``True``: ``collate_fn: cadence.data.curtail_collate``
  or ``cadence.data.pad_collate`` (which appends the padding mask: ``inputs: [wavs, texts, wav_mask]``);
- ``data_max_length``: the dataset crops its waves (``max_length``);
- a results folder that asks before it is cleared: a run folder is never overwritten without ``--overwrite``.

Run from the repository root::

    cadence fit --config examples/mulan.yaml
    python -m examples.mulan              # the same run, then prints its first and last loss
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from examples.run import run_recipe

CONFIG = Path(__file__).with_suffix(".yaml")
PAD = 0  # the text token used for padding


class TextAudioPairs(Dataset):
    """Synthetic (wave, text) pairs of different lengths: a wave is a noisy tone whose pitch is its class; its
    text is a few tokens from that class's own vocabulary.

    Items are ``(wav float (T,), text long (L,))`` with ``T`` in ``[min_len, max_len]`` (cropped to
    ``max_length``, the seed's ``data_max_length``) and ``L`` in ``[3, 6]``; token 0 is never used (padding).
    """

    def __init__(self, size: int = 1024, num_classes: int = 16, tokens_per_class: int = 3, min_len: int = 192,
                 max_len: int = 384, max_length: int | None = 320, noise: float = 0.3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.classes = torch.randint(0, num_classes, (size,), generator=g)
        self.wavs, self.texts = [], []
        for c in self.classes.tolist():
            length = int(torch.randint(min_len, max_len + 1, (), generator=g))
            freq = 0.03 + 0.25 * c / num_classes  # cycles per sample
            phase = float(torch.rand((), generator=g)) * 2 * math.pi
            t = torch.arange(length, dtype=torch.float32)
            wav = torch.sin(2 * math.pi * freq * t + phase) + noise * torch.randn(length, generator=g)
            self.wavs.append(wav[:max_length] if max_length else wav)
            n_tokens = int(torch.randint(3, 7, (), generator=g))
            self.texts.append(1 + c * tokens_per_class + torch.randint(0, tokens_per_class, (n_tokens,), generator=g))

    def __len__(self) -> int:
        return len(self.wavs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wavs[i], self.texts[i]


class MuLaN(nn.Module):
    """A tiny MuLaN: a convolutional audio tower and a bag-of-tokens text tower, both mapped to a shared unit
    sphere; the loss is the symmetric InfoNCE over the batch (each wave against every text), as the seed's.

    ``forward(wavs, texts, wav_mask=None)`` returns the scalar loss; ``wav_mask`` (True on real samples) comes
    with ``pad_collate``. Text padding (token 0) is masked out.
    """

    def __init__(self, num_text_tokens: int = 64, dim: int = 64, channels: int = 32) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Conv1d(1, channels, 16, stride=4), nn.GELU(),
                                   nn.Conv1d(channels, channels, 5, stride=2), nn.GELU())
        self.audio_proj = nn.Linear(channels, dim)
        self.text_embed = nn.Embedding(num_text_tokens, dim, padding_idx=PAD)
        self.text_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))

    def embed_audio(self, wavs: torch.Tensor, wav_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.audio(wavs.unsqueeze(1))  # (B, C, T')
        if wav_mask is None:
            pooled = h.mean(-1)
        else:  # the conv outputs whose window starts on a real sample
            keep = wav_mask[:, :: 8][:, : h.shape[-1]].float().unsqueeze(1)
            keep = F.pad(keep, (0, h.shape[-1] - keep.shape[-1]))
            pooled = (h * keep).sum(-1) / keep.sum(-1).clamp(min=1)
        return F.normalize(self.audio_proj(pooled), dim=-1)

    def embed_text(self, texts: torch.Tensor) -> torch.Tensor:
        keep = (texts != PAD).float().unsqueeze(-1)
        pooled = (self.text_embed(texts) * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, wavs: torch.Tensor, texts: torch.Tensor, wav_mask: torch.Tensor | None = None) -> torch.Tensor:
        if wavs.shape[0] < 2:
            raise ValueError("batch size must be greater than 1 for contrastive learning (but ideally as large as "
                             "possible); raise batch_size or set drop_last")
        sim = self.embed_audio(wavs, wav_mask) @ self.embed_text(texts).t() * self.log_temperature.exp()
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.mulan [overrides]``: ``cadence fit`` on this recipe's YAML, then its first and last
    logged training loss. Overrides are ``cadence fit`` options (``--trainer.max_steps 50``, ``--run-dir D``)."""
    return run_recipe(CONFIG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
