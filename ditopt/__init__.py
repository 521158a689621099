"""ditopt: a torch.compile backend for training-free acceleration of video diffusion transformers.

    model = torch.compile(model, backend="ditopt")                       # preset "balanced"
    model = torch.compile(model, backend="ditopt", options={"preset": "lossless"})   # exact

The backend is registered through the `torch_dynamo_backends` entry point;
importing ditopt is not needed to use it.
"""

from . import contexts  # noqa: F401  (records diffusers' cache_context names from the start)
from .config import Config, preset_config
from .pipelines import apply, calibrate
from .runtime import explain, generation, reset, stats
from .tune import tune

__version__ = "0.1.0"
__all__ = ["Config", "apply", "calibrate", "preset_config", "explain", "generation", "reset", "stats", "tune", "__version__"]
