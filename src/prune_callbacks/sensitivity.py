"""``python -m prune_callbacks.sensitivity``: sensitivity scan and per-group ratio allocation (see
:mod:`.app.sensitivity`)."""

from .app.sensitivity import main

if __name__ == "__main__":
    main()
