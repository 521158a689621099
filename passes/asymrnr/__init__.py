"""AsymRnR: fewer video tokens inside self-attention, Q and K/V reduced separately.

    options={"asymrnr": {"q_ratio": 0.5, "kv_ratio": 0.3}}
"""

from ditopt.method import Method

from .config import AsymRnRConfig, normalize
from .hook import MatchPlanner, MatchSite, RatioSchedule, StreamMatches, make_hook, tiers_to_ratios
from . import rewrite

METHOD = Method("asymrnr", AsymRnRConfig, rewrite.rewrite, make_hook, normalize=normalize)

__all__ = ["METHOD", "AsymRnRConfig", "MatchPlanner", "MatchSite", "RatioSchedule", "StreamMatches",
           "tiers_to_ratios"]
