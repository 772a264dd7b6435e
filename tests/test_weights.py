"""The one ``_orig_mod`` rule (``weights.strip_compiled``): names of a ``torch.compile``d model as the model
itself names them; ``load_weights`` and a model's extra state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cadence import ConfigError, Trainer, load_weights
from cadence.weights import clean_state_dict, strip_compiled, unwrap_compiled


def test_strip_compiled_removes_every_orig_mod_part_and_nothing_else() -> None:
    assert strip_compiled("_orig_mod.net.0.weight") == "net.0.weight"
    assert strip_compiled("_orig_mod") == ""  # the compiled wrapper's own module name
    assert strip_compiled("encoder._orig_mod.fc.bias") == "encoder.fc.bias"  # a compiled submodule
    assert strip_compiled("net.0.weight") == "net.0.weight"
    assert strip_compiled("my_orig_mod.weight") == "my_orig_mod.weight"  # only whole parts


class Compiled(nn.Module):
    """Stands in for ``torch.compile(model)`` (whose names tests/test_compiling.py checks): the model under
    ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_a_compiled_model_gives_the_plain_models_names() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    compiled = Compiled(model)
    assert unwrap_compiled(compiled) is model and unwrap_compiled(model) is model
    assert [strip_compiled(n) for n, _ in compiled.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(clean_state_dict(compiled)) == list(model.state_dict())


class Counting(nn.Module):
    """A model with extra state (``get_extra_state``): how many batches it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.seen = 0

    def forward(self, x, y):
        self.seen += 1
        return nn.functional.cross_entropy(self.fc(x), y)

    def get_extra_state(self):
        return {"seen": self.seen}

    def set_extra_state(self, state):
        self.seen = state["seen"]


def test_load_weights_is_strict_on_the_model_that_wrote_the_file(tmp_path) -> None:
    model = Counting()
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    Trainer(model, (x, y), batch_size=16, max_steps=3, device="cpu", progress=False, run_dir=tmp_path / "run").fit()
    path = tmp_path / "run" / "final" / "model.safetensors"
    assert load_weights(model, path) is model  # strict: the extra state is not a weight, and is kept
    assert model.seen == 3
    fresh = load_weights(Counting(), path)
    assert torch.equal(fresh.fc.weight, model.fc.weight) and fresh.seen == 0
    with pytest.raises(ConfigError, match="missing: fc.bias"):
        load_weights(Counting(), _without(path, "fc.bias", tmp_path / "cut.safetensors"))


def _without(path, key, out):
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, out)
    return out
