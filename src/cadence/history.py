"""What ``fit()`` returns and ``validate()`` reports."""

from __future__ import annotations

from typing import Any


class History(list):
    """The logged records in order (the same objects ``metrics.jsonl`` holds).

    ``history[i]`` is a record; ``history["val/loss"]`` is the series of one metric, read from the records of
    its split (``"train/loss"``, ``"train/<part>"``, ``"val/acc"``, ``"lr"``...).
    """

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, str):
            return super().__getitem__(key)
        split, _, name = key.partition("/")
        if not name:
            return [r[key] for r in self if key in r]
        out = []
        for r in self:
            if r.get("split") != split:
                continue
            value = r.get(name, r.get("parts", {}).get(name))
            if value is not None:
                out.append(value)
        return out

    def last(self, split: str) -> dict[str, Any] | None:
        """The newest record of ``split`` ("train" or "val") with a loss (events such as a stop are skipped)."""
        for r in reversed(self):
            if r.get("split") == split and "loss" in r and "event" not in r:
                return r
        return None


class Metrics(dict):
    """Validation metrics keyed ``val/<name>`` (``test/<name>`` from ``test()``: ``split``); a bare name
    (``metrics["loss"]``) finds ``<split>/<name>`` too."""

    split = "val"

    def __missing__(self, key: str) -> float:
        if isinstance(key, str) and not key.startswith(f"{self.split}/") and f"{self.split}/{key}" in self:
            return self[f"{self.split}/{key}"]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or (isinstance(key, str) and super().__contains__(f"{self.split}/{key}"))
