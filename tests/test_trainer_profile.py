"""profile=(start, end) writes a torch.profiler trace of those steps into the run folder."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cadence import ConfigError, Trainer


def test_profile_writes_a_chrome_trace(tmp_path) -> None:
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    t = Trainer(model, x, forward=lambda m, b: m(b).pow(2).mean(), batch_size=8, max_steps=12, run_dir=tmp_path / "r",
                profile=(3, 6), progress=False, device="cpu")
    t.fit()
    trace = json.loads((tmp_path / "r" / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("addmm" in n or "linear" in n for n in names)


def test_profile_needs_a_run_folder_and_a_window() -> None:
    with pytest.raises(ConfigError, match="profile"):
        Trainer(nn.Linear(4, 1), torch.randn(8, 4), forward=lambda m, b: m(b).mean(), max_steps=2, profile=(1, 2))
    with pytest.raises(ConfigError, match="profile"):
        Trainer(nn.Linear(4, 1), torch.randn(8, 4), forward=lambda m, b: m(b).mean(), max_steps=2,
                run_dir="unused-run-folder", profile=(5, 2))
