"""Checkpoints: safetensors + JSON + a manifest, committed atomically, verified before use; never pickle."""

from .format import CheckpointError, read_json, read_tensors, verify, write_checkpoint
from .store import Checkpoints

__all__ = ["CheckpointError", "Checkpoints", "read_json", "read_tensors", "verify", "write_checkpoint"]
