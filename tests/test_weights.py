"""The one ``_orig_mod`` rule (``weights.strip_compiled``): names of a ``torch.compile``d model as the model
itself names them."""

from __future__ import annotations

from torch import nn

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
