"""Host copies of the training state for a background checkpoint writer, in buffers kept between saves.

An async save must copy the state before training changes it in place; that copy is all the training loop
waits for. Fresh memory is page-faulted on its first touch, which costs about as much as the copy itself, so
the buffers of one save are reused by the next (the caller waits for the write that reads them first). From
CUDA the buffers are pinned and filled without blocking, then synchronized once.
"""

from __future__ import annotations

import torch


class Staging:
    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._from_cuda = False

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` in the buffer kept for ``key`` (a new one if the shape or dtype changed)."""
        buf = self._buffers.get(key)
        cuda = tensor.device.type == "cuda"
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
            self._buffers[key] = buf
        buf.copy_(tensor, non_blocking=cuda)
        self._from_cuda |= cuda
        return buf

    def copier(self, prefix: str):  # noqa: ANN201 - a (name, tensor) -> tensor callable
        return lambda name, tensor: self.copy(f"{prefix}/{name}", tensor)

    def finish(self) -> None:
        """Wait for the copies in flight (non-blocking ones from CUDA) to land."""
        if self._from_cuda:
            torch.cuda.synchronize()
            self._from_cuda = False
