"""``python -m prune_callbacks.report SWEEP_DIR``: report of a sweep (see :mod:`.app.report`)."""

import sys

from .app.report import main

if __name__ == "__main__":
    sys.exit(main())
