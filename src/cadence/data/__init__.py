"""Data: the order contract, loading, validation splits, several sources, balanced sampling, collation."""

from .collate import PadCollate, curtail_collate, pad_collate

__all__ = ["PadCollate", "curtail_collate", "pad_collate"]
