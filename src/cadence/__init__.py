"""cadence: a small, fast, exact PyTorch trainer."""

from .callbacks import Callback
from .ema import EMA
from .errors import ConfigError
from .plateau import Plateau
from .stages import Stage
from .stopping import EarlyStopping
from .trainer import Trainer
from .version import __version__ as __version__
from .weights import load_weights

__all__ = ["EMA", "Callback", "ConfigError", "EarlyStopping", "Plateau", "Stage", "Trainer", "load_weights"]
