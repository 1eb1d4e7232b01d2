"""``python -m prune_callbacks.train``: the Hydra prune-finetune app (see :mod:`.app.train`)."""

from .app.train import main

if __name__ == "__main__":
    main()
