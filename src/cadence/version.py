"""cadence's version, in a module of its own: code inside the package (a checkpoint's metadata) reads it from
here, since importing it from ``cadence`` itself would run the package's ``__init__``, which imports the Trainer,
which imports that code (an import cycle)."""

__version__ = "0.1.0"
