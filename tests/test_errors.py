"""Bad input: one ``ConfigError`` each, naming the argument and the bad value, raised as early as possible."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import cadence
from cadence import ConfigError
from helpers import MLP, assert_weights_equal, clone, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert cadence.ConfigError is ConfigError


# ----------------------------------------------------------------------------------------------- arguments
# (overrides of a valid call, pieces every message must contain)
ARGUMENT_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("batch_size_zero", {"batch_size": 0}, ["batch_size=0"]),
    ("batch_size_negative", {"batch_size": -4}, ["batch_size=-4"]),
    ("no_length", {"max_steps": None, "max_epochs": None}, ["max_steps=None", "max_epochs"]),
    ("grad_accum_zero", {"grad_accum": 0}, ["grad_accum=0"]),
    ("grad_accum_negative", {"grad_accum": -2}, ["grad_accum=-2"]),
    ("lr_zero", {"lr": 0.0}, ["lr=0.0"]),
    ("lr_negative", {"lr": -0.1}, ["lr=-0.1"]),
    ("unknown_optimizer", {"optimizer": "adamz"}, ["optimizer='adamz'", "adamw", "sgd", "lion"]),
    ("unknown_schedule", {"schedule": "cosinus"}, ["schedule='cosinus'", "cosine", "linear", "multistep"]),
    ("warmup_longer_than_run", {"max_steps": 5, "warmup_steps": 10}, ["warmup_steps=10", "5"]),
    ("warmup_longer_than_epochs", {"max_steps": None, "max_epochs": 1, "warmup_steps": 10},
     ["warmup_steps=10", "4"]),
    ("valid_frac_zero", {"valid_frac": 0.0}, ["valid_frac=0.0"]),
    ("valid_frac_one", {"valid_frac": 1.0}, ["valid_frac=1.0"]),
    ("valid_frac_above_one", {"valid_frac": 1.5}, ["valid_frac=1.5"]),
    ("valid_frac_negative", {"valid_frac": -0.2}, ["valid_frac=-0.2"]),
    ("val_every_without_val_data", {"val_every": 5}, ["val_every=5", "val_data"]),
    ("valid_frac_and_val_data", {"valid_frac": 0.2, "val_data": make_data(10)}, ["valid_frac=0.2", "val_data"]),
    ("precision_16_on_cpu", {"precision": "16"}, ["precision='16'", "bf16"]),
    ("unknown_precision", {"precision": "8"}, ["precision='8'", "bf16"]),
    ("unknown_device", {"device": "tpu9"}, ["device='tpu9'", "cpu"]),
    ("drop_last_dataset_smaller_than_batch", {"batch_size": 64, "drop_last": True},
     ["batch_size=64", "drop_last"]),
    ("drop_last_smaller_than_step", {"batch_size": 16, "grad_accum": 4, "drop_last": True},
     ["batch_size=16", "drop_last", "64"]),
    ("max_grad_norm_zero", {"max_grad_norm": 0.0}, ["max_grad_norm=0.0"]),
    ("log_every_zero", {"log_every": 0}, ["log_every=0"]),
    ("weight_decay_negative", {"weight_decay": -0.01}, ["weight_decay=-0.01"]),
    ("split_by_without_valid_frac", {"split_by": len}, ["split_by=", "valid_frac"]),
    ("multistep_without_milestones", {"schedule": "multistep"}, ["milestones=()", "multistep"]),
    ("batch_size_float", {"batch_size": 2.5}, ["batch_size=2.5"]),
    ("batch_size_bool", {"batch_size": True}, ["batch_size=True"]),
    ("max_steps_zero", {"max_steps": 0}, ["max_steps=0"]),
    ("max_epochs_zero", {"max_steps": None, "max_epochs": 0}, ["max_epochs=0"]),
    ("val_every_zero", {"val_data": make_data(10), "val_every": 0}, ["val_every=0"]),
    ("warmup_steps_negative", {"warmup_steps": -1}, ["warmup_steps=-1"]),
    ("warmup_start_lr_negative", {"warmup_start_lr": -0.5}, ["warmup_start_lr=-0.5"]),
    ("num_workers_negative", {"num_workers": -1}, ["num_workers=-1"]),
]


@pytest.mark.parametrize("overrides,pieces", [c[1:] for c in ARGUMENT_CASES], ids=[c[0] for c in ARGUMENT_CASES])
def test_bad_argument_raises_before_training(overrides, pieces):
    model = MLP()
    before = clone(model)
    kw: dict[str, Any] = {"batch_size": 16, "max_steps": 20}
    kw.update(overrides)
    with pytest.raises(ConfigError) as info:
        trainer(model, make_data(50), **kw)
    message = str(info.value)
    for piece in pieces:
        assert piece in message, f"{piece!r} missing from {message!r}"
    assert_weights_equal(model, before)


def test_valid_frac_leaving_validation_empty():
    with pytest.raises(ConfigError) as info:
        trainer(MLP(), make_data(3), batch_size=2, max_steps=2, valid_frac=0.1)
    message = str(info.value)
    assert "valid_frac=0.1" in message
    assert "3 items" in message


def test_valid_frac_leaving_training_empty():
    with pytest.raises(ConfigError) as info:
        trainer(MLP(), make_data(3), batch_size=2, max_steps=2, valid_frac=0.9)
    message = str(info.value)
    assert "valid_frac=0.9" in message
    assert "no training" in message


def test_valid_frac_leaving_a_group_side_empty():
    x, y = make_data(6)
    with pytest.raises(ConfigError) as info:
        trainer(MLP(), (x, y), batch_size=2, max_steps=2, valid_frac=0.2, split_by=lambda item: int(item[1]))
    message = str(info.value)
    assert "valid_frac=0.2" in message
    assert "groups" in message


@pytest.mark.parametrize(
    "empty",
    [(torch.empty(0, 8), torch.empty(0, dtype=torch.long)), torch.empty(0, 8),
     torch.utils.data.TensorDataset(torch.empty(0, 8)), []],
    ids=["tuple_of_tensors", "tensor", "tensor_dataset", "list"],
)
def test_empty_dataset(empty):
    with pytest.raises(ConfigError) as info:
        trainer(MLP(), empty, batch_size=4, max_steps=3)
    message = str(info.value)
    assert "train_data=" in message
    assert "length 0" in message
    assert "empty" in message


def test_empty_map_style_dataset():
    from helpers import PairDataset

    with pytest.raises(ConfigError, match=r"train_data=.*PairDataset of length 0.*empty"):
        trainer(MLP(), PairDataset(torch.empty(0, 8)), batch_size=4, max_steps=3)


def test_empty_dataloader_fails_at_first_step():
    loader = DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 8), torch.empty(0, dtype=torch.long)),
                        batch_size=4)
    t = trainer(MLP(), loader, max_steps=3)
    with pytest.raises(ConfigError, match=r"train_data=.*no batches.*empty"):
        t.fit()
    assert t.step == 0


def test_tensors_of_different_lengths():
    x, y = make_data(20)
    with pytest.raises(ConfigError, match=re.escape("train_data='tensors of lengths [19, 20]'")):
        trainer(MLP(), (x, y[:19]), batch_size=4, max_steps=3)


def test_valid_frac_with_a_dataloader():
    loader = DataLoader(torch.utils.data.TensorDataset(*make_data(20)), batch_size=4)
    with pytest.raises(ConfigError) as info:
        trainer(MLP(), loader, max_steps=3, valid_frac=0.2)
    message = str(info.value)
    assert "valid_frac=0.2" in message and "DataLoader" in message and "val_data" in message


def test_decaying_schedule_over_an_iterable_of_unknown_length():
    class Batches:
        def __iter__(self):
            return iter([make_data(4)])

    with pytest.raises(ConfigError, match=r"schedule='linear'.*max_steps"):
        trainer(MLP(), Batches(), max_epochs=2, schedule="linear")


def test_model_with_no_trainable_parameters():
    model = MLP()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError) as info:
        trainer(model, make_data(20), batch_size=4, max_steps=3)
    message = str(info.value)
    assert "model='MLP'" in message
    assert "requires_grad" in message


def test_not_a_module():
    with pytest.raises(ConfigError, match=r"model='function'"):
        trainer(lambda x, y: x.sum(), make_data(20), batch_size=4, max_steps=3)


def test_cuda_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=r"device='cuda'.*CUDA"):
        trainer(MLP(), make_data(20), batch_size=4, max_steps=3, device="cuda")


# ----------------------------------------------------------------------------------------------- model output
class Returns(nn.Module):
    """A model whose forward returns ``make(loss, logits)``; the loss is a proper mean cross-entropy."""

    def __init__(self, make) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.make = make

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        logits = self.lin(x)
        return self.make(F.cross_entropy(logits, y), logits)


OUTPUT_CASES = [
    ("dict_without_loss", lambda loss, logits: {"logits": logits, "total": loss},
     ["model output=", "'loss'", "logits", "total"]),
    ("non_scalar_loss", lambda loss, logits: logits.sum(dim=1), ["model output loss=", "(4,)", "scalar"]),
    ("non_scalar_loss_in_dict", lambda loss, logits: {"loss": logits[:, 0]}, ["model output loss=", "(4,)"]),
    ("detached_loss", lambda loss, logits: loss.detach(), ["model output loss=", "no grad"]),
    ("constant_loss", lambda loss, logits: torch.tensor(1.0), ["model output loss=", "no grad"]),
    ("part_not_scalar_tuple", lambda loss, logits: (loss, {"vec": torch.ones(3, 2)}),  # a vector is summed
     ["model output part 'vec'", "(3, 2)", "scalar"]),
    ("part_not_scalar_dict", lambda loss, logits: {"loss": loss, "logits": logits},
     ["model output part 'logits'", "(4, 2)"]),
    ("part_not_a_number", lambda loss, logits: {"loss": loss, "name": "abc"}, ["model output part 'name'", "str"]),
    ("loss_not_a_tensor", lambda loss, logits: {"loss": 1.5}, ["model output loss=", "float"]),
    ("unreadable_output", lambda loss, logits: [loss, loss, loss], ["model output=", "list"]),
]


@pytest.mark.parametrize("make,pieces", [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_bad_model_output_raises_at_first_step(make, pieces):
    model = Returns(make)
    before = clone(model)
    t = trainer(model, make_data(20), batch_size=4, max_steps=3)  # building works: the output is not seen yet
    with pytest.raises(ConfigError) as info:
        t.fit()
    message = str(info.value)
    for piece in pieces:
        assert piece in message, f"{piece!r} missing from {message!r}"
    assert t.step == 0
    assert_weights_equal(model, before)


# ----------------------------------------------------------------------------------------------- routing
class Blob:
    """A batch cadence cannot route."""

    def __init__(self, items: list[str]) -> None:
        self.items = items


class Strings(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> str:
        return f"item{i}"


def test_unroutable_batch_from_a_dataloader():
    loader = DataLoader(Strings(), batch_size=4, collate_fn=Blob)
    t = trainer(MLP(), loader, max_steps=2)
    with pytest.raises(ConfigError) as info:
        t.fit()
    message = str(info.value)
    assert "batch='Blob'" in message
    assert "forward=" in message
    assert t.step == 0


def test_unroutable_batch_from_a_map_style_dataset_with_collate_fn():
    t = trainer(MLP(), Strings(), batch_size=4, max_steps=2, collate_fn=Blob)
    with pytest.raises(ConfigError, match=re.escape("batch='Blob'")):
        t.fit()


def test_unroutable_batch_is_fine_with_forward():
    """The same batches train once ``forward=`` says how to call the model."""
    model = MLP()
    x, y = make_data(8)

    def forward(m, batch):
        idx = torch.tensor([int(s[4:]) for s in batch.items])
        return m(x[idx], y[idx])

    t = trainer(model, DataLoader(Strings(), batch_size=4, collate_fn=Blob), max_steps=2, forward=forward)
    t.fit()
    assert t.step == 2


def test_validate_without_validation_data():
    t = trainer(MLP(), make_data(20), batch_size=4, max_steps=2)
    with pytest.raises(ConfigError, match=r"val_data=None"):
        t.validate()
