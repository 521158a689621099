"""ToCa: token-wise caching of cross-attention, MLP and self-attention outputs.

    options={"toca": {"interval": 3, "ratio": 0.1}}  or  {"toca": {"reference": "pixart"}}
"""

from ditopt.method import Method

from .config import KINDS, TOCA_REFERENCES, ToCaConfig, normalize
from .hook import TocaPlanner, make_hook, quantised_rows, step_factor
from . import rewrite

METHOD = Method("toca", ToCaConfig, rewrite.rewrite, make_hook, normalize=normalize)

__all__ = ["METHOD", "KINDS", "TOCA_REFERENCES", "ToCaConfig", "TocaPlanner", "quantised_rows", "step_factor"]
