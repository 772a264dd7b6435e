"""The ported training scripts in examples/ (short runs): what they promise holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from helpers import CrashAt, assert_weights_equal

pytest.importorskip("sklearn")


def example(name: str):  # noqa: ANN201 - the example's module
    """Import ``examples/<name>.py`` without putting examples/ on sys.path."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = example("augmented_classifier").build


def test_augmented_classifier_resumes_bitwise_and_ignores_the_worker_count(tmp_path):
    """Random shifts in __getitem__ and a per-epoch StepLR: a crash at step 15 and a resume (from step 10)
    end where an uninterrupted run does, and two workers train the same weights as none."""
    whole = build(str(tmp_path / "whole"), epochs=1, progress=False, device="cpu")
    whole.fit()
    cut = build(str(tmp_path / "cut"), epochs=1, progress=False, device="cpu", callbacks=[CrashAt(15)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        cut.fit()
    resumed = build(str(tmp_path / "cut"), epochs=1, resume=True, progress=False, device="cpu")
    resumed.fit()
    assert_weights_equal(resumed.model, whole.model)
    workers = build(None, epochs=1, workers=2, progress=False, device="cpu")
    workers.fit()
    assert_weights_equal(workers.model, whole.model)


def test_the_per_epoch_rate_follows_steplr():
    t = build(None, epochs=3, progress=False, device="cpu", max_steps=50)  # 22 steps per epoch
    rates = [t.schedule(s) for s in (0, 21, 22, 43, 44)]
    assert rates == pytest.approx([3e-3, 3e-3, 3e-3 * 0.7, 3e-3 * 0.7, 3e-3 * 0.49])
