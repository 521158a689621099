"""TeaCache: skip every block while the first block's modulated input changes little.

    options={"preset": "lossless", "teacache": {"threshold": 0.1}}
"""

from ditopt.method import Method

from .config import TeaCacheConfig
from .hook import TeaCachePolicy, make_hook, rescale, teacache_decisions
from . import rewrite

METHOD = Method("teacache", TeaCacheConfig, rewrite.rewrite, make_hook, conflicts=("adacache",),
                chain_policy=lambda cfg, probe: TeaCachePolicy(cfg, probe))

__all__ = ["METHOD", "TeaCacheConfig", "TeaCachePolicy", "rescale", "teacache_decisions"]
