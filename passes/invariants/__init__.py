"""Step-invariant caching: what depends only on inputs that stay the same across the steps of a
generation (the text's cross-attention K/V, caption embedders, RoPE tables) is computed once per
generation and stream, and again whenever one of those inputs changes.  Lossless: the cached values
are the values the graph would compute.

    options={"invariants": True}        (every preset, `lossless` included, turns it on)
"""

from ditopt.method import Method

from . import rewrite
from .config import InvariantsConfig
from .hook import make_hook

METHOD = Method("invariants", InvariantsConfig, rewrite.rewrite, make_hook, exact=True)

__all__ = ["METHOD", "InvariantsConfig"]
