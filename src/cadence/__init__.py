"""cadence: a small, fast, exact PyTorch trainer."""

from .callbacks import Callback
from .ema import EMA
from .errors import ConfigError
from .stages import Stage
from .stopping import EarlyStopping
from .trainer import Trainer
from .weights import load_weights

__all__ = ["EMA", "Callback", "ConfigError", "EarlyStopping", "Stage", "Trainer", "load_weights"]
__version__ = "0.1.0"
