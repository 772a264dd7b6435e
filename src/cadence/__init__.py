"""cadence: a small, fast, exact PyTorch trainer."""

from .callbacks import Callback
from .errors import ConfigError
from .trainer import Trainer

__all__ = ["Callback", "ConfigError", "Trainer"]
__version__ = "0.1.0"
