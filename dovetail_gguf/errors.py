"""Exceptions with messages a user can act on.

Every error that reaches the CLI is a :class:`DovetailError`; the CLI prints its
message on one line and exits non-zero.
"""


class DovetailError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFileError(DovetailError):
    """A model file is missing, unreadable, not GGUF, truncated or unsupported."""


class ContextFullError(DovetailError):
    """The prompt, or prompt plus generation, does not fit the context window."""


class DraftMismatchError(DovetailError):
    """A draft was loaded with a target it was not made for."""


class InvalidArgumentError(DovetailError, ValueError):
    """A caller passed a value outside its valid range."""


class LlamaCallError(DovetailError):
    """llama.cpp returned an error code."""
