"""Data: the order contract, loading, validation splits, several sources, balanced sampling, collation."""

from .collate import curtail_collate, pad_collate

__all__ = ["curtail_collate", "pad_collate"]
