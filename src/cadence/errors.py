"""The one exception type cadence raises for a user's mistake.

It subclasses ``ValueError`` so that code catching the built-in keeps working; the message always names the
argument, the value that was given and what to do instead.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad argument, found before (or at the first moment) it could do harm."""


def bad(argument: str, value: object, fix: str) -> ConfigError:
    """Build the standard message: ``argument=value``: what is wrong and how to fix it."""
    return ConfigError(f"{argument}={value!r}: {fix}")
