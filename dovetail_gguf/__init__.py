"""dovetail-gguf: Dovetail speculative decoding with a GGUF target on the CPU and a PyTorch draft on the GPU."""

from .accept import SamplingParams
from .api import Dovetail, Stream
from .chat import render_chat
from .engine import Engine
from .options import LIMITS, GenerateOptions
from .types import Drafter, DraftTree, GenerationResult, GenerationStats, TreeConfig
from .errors import ContextFullError, DovetailError, DraftMismatchError, InvalidArgumentError, ModelFileError
from .target import Target, TargetConfig

try:  # the one place the version is written is pyproject.toml
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("dovetail-gguf")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ContextFullError", "Dovetail", "DovetailError", "DraftMismatchError", "DraftTree", "Drafter", "Engine", "GenerateOptions",
    "GenerationResult", "GenerationStats", "InvalidArgumentError", "LIMITS", "ModelFileError", "SamplingParams",
    "Stream", "Target", "TargetConfig", "TreeConfig", "render_chat",
]
