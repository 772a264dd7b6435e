"""The ``cadence`` command line (imported only when it runs, so ``import cadence`` stays light)."""
