"""HF / Meta LLaMA-family checkpoints to GGUF (``dovetail convert``)."""

from .hf import OUT_TYPES, convert

__all__ = ["OUT_TYPES", "convert"]
