"""ditopt: a torch.compile backend for training-free acceleration of video diffusion transformers.

    model = torch.compile(model, backend="ditopt")                       # preset "balanced"
    model = torch.compile(model, backend="ditopt", options={"preset": "lossless"})   # exact

The backend is registered through the `torch_dynamo_backends` entry point;
importing ditopt is not needed to use it.
"""

from pathlib import Path as _Path

# passes/ and kernels/ sit at the repository root, beside this package, without an __init__.py: run from
# the root, Python puts the root on sys.path, and a regular package there named `kernels` would shadow
# the PyPI package of that name (transformers 5 installs it; diffusers imports it).  A wheel installs them
# as ditopt/passes and ditopt/kernels; in a source checkout (the editable install) the root joins this
# package's search path, so that they import as ditopt.passes and ditopt.kernels there too.
_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "passes" / "pipeline.py").is_file() and (_ROOT / "kernels" / "matching.py").is_file():
    __path__.append(str(_ROOT))

from . import contexts  # noqa: F401  (records diffusers' cache_context names from the start)
from .config import Config, preset_config
from .pipelines import apply, calibrate
from .runtime import explain, generation, reset, stats
from .tune import tune

__version__ = "0.1.0"
__all__ = ["Config", "apply", "calibrate", "preset_config", "explain", "generation", "reset", "stats", "tune", "__version__"]
