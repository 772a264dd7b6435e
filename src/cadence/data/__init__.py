"""Data: the order contract, loading, validation splits."""
