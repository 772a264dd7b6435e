"""``python -m cadence`` is the ``cadence`` command."""

from .cli.main import main

raise SystemExit(main())
