"""Running means that stay on the device between log points and are read with one host transfer."""

from __future__ import annotations

import torch


class RunningMeans:
    """Collects one scalar tensor per name per step; ``read()`` averages them with a single sync.

    Adding a step costs list appends only (no kernel launch); the tensors are stacked at read time.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        values = self._values.get(name)
        if values is None:
            self._values[name] = [value]
        else:
            values.append(value)

    def __bool__(self) -> bool:
        return bool(self._values)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The values not yet read, one stacked tensor per name (for checkpoints)."""
        return {name: torch.stack(values).detach().to("cpu") for name, values in self._values.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._values = {name: list(t.unbind()) for name, t in tensors.items()}

    def read(self) -> dict[str, float]:
        """The mean of every name since the last read; clears the buffers."""
        if not self._values:
            return {}
        names = list(self._values)
        means = torch.stack([torch.stack(self._values[n]).float().mean() for n in names])
        self._values = {}
        return dict(zip(names, means.tolist()))


def read_scalars(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Several device scalars as floats with one transfer."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.float().reshape(()) for v in values.values()]).tolist()))
