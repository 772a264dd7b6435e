"""Loggers: each is ``log(record)`` + ``close()``, called by the outer loop at log points on rank 0."""

from __future__ import annotations

from typing import Any, Protocol


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
