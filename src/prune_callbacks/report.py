"""``python -m prune_callbacks.report SWEEP_DIR``: report of a sweep (see :mod:`prune_callbacks.app.report`)."""

import sys

from .app.report import main

if __name__ == "__main__":
    sys.exit(main())
