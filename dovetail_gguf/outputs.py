"""Where commands may write: checked before any work starts, so nothing a user owns is lost.

Rules, the same for every command:
- a file that exists is replaced only with ``force``;
- a folder that exists is replaced only with ``force`` and only when it is
  recognisably one of ours (``is_ours``, e.g. a draft folder by its config);
- the current folder, one of its parents, the home folder and ``/`` are never replaced;
- the parent folder must exist (or be creatable) and be writable, checked up front,
  so a long run cannot fail at its very end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import InvalidArgumentError


def _protected(p: Path) -> bool:
    """True for folders no command may ever replace: /, home, the current folder and its parents."""
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    return p == Path(p.anchor) or p == home or p == cwd or p in cwd.parents


def _check_parent(p: Path) -> None:
    parent = p.parent
    existing = parent
    while not existing.exists():  # the nearest folder that exists must let us create the rest
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidArgumentError(f"cannot write {p}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"cannot write {p}: {existing} is not writable")


def check_output_file(path: str | os.PathLike, force: bool = False) -> Path:
    """``path`` as a file this command may write: new, or existing and ``force``."""
    if not str(path).strip():
        raise InvalidArgumentError("the output file name is empty")
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidArgumentError(f"{p} is a folder; give a file name")
    if p.exists() and not force:
        raise InvalidArgumentError(f"{p} already exists; pass --force to overwrite it")
    _check_parent(p.resolve())
    return p


def check_output_dir(path: str | os.PathLike, force: bool, is_ours: Callable[[Path], bool], kind: str) -> Path:
    """``path`` as a folder this command may (re)create: new, or with ``force`` an existing ``kind`` folder."""
    if not str(path).strip():
        raise InvalidArgumentError("the output folder name is empty")
    p = Path(path).expanduser()
    resolved = p.resolve()
    if _protected(resolved):
        raise InvalidArgumentError(f"refusing to write a {kind} into {p}: it would replace {resolved}")
    if p.exists() or p.is_symlink():
        if not force:
            raise InvalidArgumentError(f"{p} already exists; pass --force to replace it")
        if p.is_symlink() or not p.is_dir() or not is_ours(p):
            raise InvalidArgumentError(f"{p} exists and is not a {kind}; refusing to replace it, even with --force")
    _check_parent(resolved)
    return p
