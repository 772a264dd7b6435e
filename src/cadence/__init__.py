"""cadence: a small, fast, exact PyTorch trainer."""

from .callbacks import Callback
from .errors import ConfigError
from .trainer import Trainer
from .weights import load_weights

__all__ = ["Callback", "ConfigError", "Trainer", "load_weights"]
__version__ = "0.1.0"
