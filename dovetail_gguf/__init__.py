"""dovetail-gguf: Dovetail speculative decoding with a GGUF target on the CPU and a PyTorch draft on the GPU."""

from .accept import SamplingParams
from .api import Dovetail, Stream
from .chat import render_chat
from .engine import Engine
from .types import Drafter, DraftTree, GenerateOptions, GenerationResult, GenerationStats, TreeConfig
from .errors import ContextFullError, DovetailError, DraftMismatchError, InvalidArgumentError, ModelFileError
from .target import Target, TargetConfig

__version__ = "0.1.0"

__all__ = [
    "ContextFullError", "Dovetail", "DovetailError", "DraftMismatchError", "DraftTree", "Drafter", "Engine", "GenerateOptions",
    "GenerationResult", "GenerationStats", "InvalidArgumentError", "ModelFileError", "SamplingParams",
    "Stream", "Target", "TargetConfig", "TreeConfig", "render_chat",
]
