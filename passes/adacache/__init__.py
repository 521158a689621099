"""AdaCache (with MoReg): skip runs of blocks while their output changes slowly.

    options={"adacache": {"codebook": {0.08: 6, ..., inf: 1}, "moreg": True}}
"""

from ditopt.method import Method

from .calibrate import calibrate, calibrate_from_metrics, codebook_for_scale
from .config import AdaCacheConfig, normalize
from .hook import CODEBOOKS, AdaCachePolicy, chain_policy, decisions_from_metrics, make_hook, motion_score, next_rate
from . import rewrite

METHOD = Method("adacache", AdaCacheConfig, rewrite.rewrite, make_hook, normalize=normalize, conflicts=("teacache",),
                chain_policy=chain_policy)

__all__ = ["METHOD", "AdaCacheConfig", "AdaCachePolicy", "CODEBOOKS", "calibrate", "calibrate_from_metrics",
           "codebook_for_scale", "decisions_from_metrics", "motion_score", "next_rate"]
