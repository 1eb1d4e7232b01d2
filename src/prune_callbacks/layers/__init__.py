"""Layer pruners: how each layer family (conv, linear, norms, embeddings, recurrent, attention, bare
parameters) loses channels in place. The graph core asks them for channel counts and pruning functions;
they know nothing of graphs. Imports torch only."""

from .pruners import *  # noqa: F403
from .pruners import __all__  # noqa: F401
