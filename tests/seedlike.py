"""Classes and functions shaped like the seed systems' own code, for ``cadence fit`` from a YAML file alone.

Like research code, they carry no type hints: ``cadence fit`` must pass each value as the YAML gives it.
Each mimics one case of issue 25: an untyped constructor with a nested module (soundstorm's
``ConformerWrapper``, tf-bind's ``AdapterModel(enformer, ...)``), a loss computed outside any module (STEP's
``scSingleBatch.loss``), nanoGPT's ``(logits, loss)``, tf-bind's ``(loss, aux_loss)``, meshgpt's per-quantizer
commit loss, a constructor that draws from Python's ``random``, and a seed's own validation split.
"""

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Points(Dataset):
    """``n`` items ``(x, y, category)``: x of ``dim`` features, y one of ``classes`` labels."""

    def __init__(self, n, dim=4, classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.category = torch.arange(n) % 4

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Trunk(nn.Module):
    """A nested module built from its own class_path (tf-bind's ``enformer`` argument)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())

    def forward(self, x):
        return self.net(x)


class Classifier(nn.Module):
    """``Classifier(trunk, classes)``: untyped, the trunk a module given by class_path; returns the loss."""

    def __init__(self, trunk, classes, hidden=8):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, y):
        return F.cross_entropy(self.head(self.trunk(x)), y)


class LogitsAndLoss(Classifier):
    """nanoGPT's ``forward(idx, targets) -> (logits, loss)``: the loss is second."""

    def forward(self, x, y):
        logits = self.head(self.trunk(x))
        return logits, F.cross_entropy(logits, y)


class WithAux(Classifier):
    """tf-bind's ``(loss, aux_loss)``: the parts are one tensor."""

    def forward(self, x, y):
        logits = self.head(self.trunk(x))
        aux = logits.pow(2).mean()
        return F.cross_entropy(logits, y) + 0.1 * aux, aux


class Quantized(Classifier):
    """meshgpt's ``(loss, (recon_loss, commit_loss))`` with ``commit_loss`` one value per quantizer."""

    def __init__(self, trunk, classes, hidden=8, quantizers=3):
        super().__init__(trunk, classes, hidden)
        self.quantizers = quantizers

    def forward(self, x, y):
        h = self.trunk(x)
        recon = F.cross_entropy(self.head(h), y)
        commit = torch.stack([h[:, i::self.quantizers].pow(2).mean() for i in range(self.quantizers)])
        return recon + commit.sum(), (recon, commit)


class NoForward(nn.Module):
    """STEP's model: its training loss is a function of the model and the batch, not its forward."""

    def __init__(self, dim, classes):
        super().__init__()
        self.encoder = nn.Linear(dim, classes)


def single_batch_loss(model, batch):
    """STEP's ``scSingleBatch.loss(x)``: computed outside any nn.Module."""
    x, y = batch
    return F.cross_entropy(model.encoder(x), y)


class RandomInit(Classifier):
    """A constructor that draws from Python's ``random`` (and numpy's), as research code does."""

    def __init__(self, trunk, classes, hidden=8):
        super().__init__(trunk, classes, hidden)
        import numpy as np

        with torch.no_grad():
            self.head.weight.mul_(random.uniform(0.5, 2.0) * float(np.random.uniform(0.5, 2.0)))


def accuracy(output, batch):
    """A validation metric of ``(logits, loss)`` and the batch."""
    return (output[0].argmax(-1) == batch[1]).float().mean()


def label_of(item):
    return int(item[1])


def every_fourth(data):
    """A seed's own split (STEP's category split): the items of category 0 held out."""
    return [i for i in range(len(data)) if int(data.category[i]) == 0]


def halving(step):
    return 0.5 ** step


def sgd(param_groups):
    return torch.optim.SGD(param_groups, momentum=0.9)


class Repeat(Dataset):
    """A dataset around another one, given by its own class_path (a nested class under ``data``)."""

    def __init__(self, base, times):
        self.base, self.times = base, times
        self.category = torch.cat([base.category] * times)

    def __len__(self):
        return len(self.base) * self.times

    def __getitem__(self, i):
        return self.base[i % len(self.base)]


class LossMethod(NoForward):
    """A model whose loss is a method other than forward (``forward: seedlike.LossMethod.loss``)."""

    def loss(self, batch):
        return single_batch_loss(self, batch)
