"""`import cadence` stays light: the CLI library and the trackers load only when used."""

from __future__ import annotations

import subprocess
import sys


def test_import_cadence_loads_no_cli_library_or_tracker() -> None:
    probe = ("import sys, cadence; print([m for m in ('jsonargparse', 'tensorboard', 'wandb', 'mlflow', "
             "'matplotlib', 'sklearn', 'yaml') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names() -> None:
    import cadence

    # the exact list: a new public name is a deliberate change of this test
    assert sorted(cadence.__all__) == ["Callback", "ConfigError", "EMA", "EarlyStopping", "Plateau", "Stage",
                                       "Trainer", "load_weights"]
    assert all(hasattr(cadence, name) for name in cadence.__all__)
