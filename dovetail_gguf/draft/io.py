"""Draft checkpoints: a folder with config.json + model.safetensors, paired with one target.

The checkpoint holds the draft's own weights (and the draft-to-target id map
of a reduced vocabulary), never the target's embedding table or LM head: those
are read from the target GGUF at load time. config.json records the target's
architecture, width, vocabulary size and tokenizer fingerprint; loading a
draft with any other target is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import DraftMismatchError, InvalidArgumentError, ModelFileError
from ..gguf_io import ModelFacts, read_facts, read_token_matrices
from ..outputs import check_output_dir
from .model import DraftConfig, DraftModel

log = logging.getLogger(__name__)

FORMAT = "dovetail-draft"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def target_record(facts: ModelFacts) -> dict:
    return {
        "architecture": facts.architecture,
        "n_embd": facts.n_embd,
        "n_vocab": facts.n_vocab,
        "tokenizer_fingerprint": facts.tokenizer_fingerprint,
        "name": facts.name,
    }


def config_for_target(facts: ModelFacts, n_layer: int = 2, fusion: str = "dgf", draft_vocab: int | None = None,
                      intermediate_size: int | None = None) -> DraftConfig:
    """A draft shaped like one decoder layer of the target, ``n_layer`` deep.

    ``intermediate_size``: the MLP's width (None: the target's); a slimmer MLP makes a cheaper CPU draft.
    """
    if facts.n_head <= 0 or facts.n_embd % facts.n_head:
        raise InvalidArgumentError(f"cannot derive attention heads from the target ({facts.n_head} heads)")
    return DraftConfig(
        n_embd=facts.n_embd,
        n_vocab=facts.n_vocab,
        n_layer=n_layer,
        n_head=facts.n_head,
        n_kv_head=facts.n_head_kv or facts.n_head,
        intermediate_size=intermediate_size or facts.n_ff or None,
        rms_norm_eps=facts.rms_norm_eps,
        rope_theta=facts.rope_theta,
        fusion=fusion,
        draft_vocab=draft_vocab,
        max_positions=max(4096, facts.n_ctx_train or 0),
        target=target_record(facts),
    )


def check_pairing(cfg: DraftConfig, facts: ModelFacts, where: str) -> None:
    """Raise DraftMismatchError unless the draft was made for this target."""
    want = cfg.target or {}
    have = target_record(facts)
    for key in ("architecture", "n_embd", "n_vocab", "tokenizer_fingerprint"):
        if want.get(key) != have[key]:
            raise DraftMismatchError(
                f"draft {where} was made for target '{want.get('name', '?')}' "
                f"({key} {want.get(key)!r}), not for '{facts.name}' ({key} {have[key]!r}) at {facts.path}"
            )


def is_draft_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose config.json declares the draft format."""
    try:
        doc = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def check_draft_output(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """``out_dir`` as a place to write a draft: a new folder, or with ``force`` an existing draft folder.

    Anything else that exists (a data folder, a project, the current folder) is refused.
    """
    return check_output_dir(out_dir, force, is_draft_dir, "draft folder")


def save_draft(model: DraftModel, out_dir: str | os.PathLike, overwrite: bool = False, extra: dict | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write the draft atomically: a temporary folder renamed into place at the end.

    ``overwrite`` replaces an existing draft folder (never anything else, see
    :func:`check_draft_output`). ``dtype`` (e.g. ``torch.float16`` for shipping)
    converts the floating-point weights. Non-finite weights are refused.
    """
    from safetensors.torch import save_file

    out = check_draft_output(out_dir, overwrite)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InvalidArgumentError(f"the draft has non-finite weights ({', '.join(bad[:3])}); not saving it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        (tmp / WEIGHTS_FILE).chmod(0o644)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **model.cfg.to_dict(), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists():  # a draft folder (checked above): move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "draft")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(draft_dir: str | os.PathLike) -> DraftConfig:
    d = Path(draft_dir)
    if not d.is_dir():
        raise ModelFileError(f"draft folder not found: {d}")
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file() or not (d / WEIGHTS_FILE).is_file():
        raise ModelFileError(f"{d} is not a draft folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        doc = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelFileError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{cfg_path} is not a dovetail draft config")
    check_config_fields(doc, cfg_path)
    fields = set(DraftConfig.__dataclass_fields__)
    try:
        return DraftConfig(**{k: v for k, v in doc.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{cfg_path}: {e}") from e


_INT_LIMITS = {  # field: largest sane value (checked before anything is allocated)
    "n_embd": 65536, "n_vocab": 4_000_000, "n_layer": 256, "n_head": 1024, "n_kv_head": 1024, "head_dim": 4096,
    "intermediate_size": 1 << 20, "max_positions": 1 << 22, "draft_vocab": 4_000_000,
}


def check_config_fields(doc: dict, where) -> None:
    """Types and ranges of a draft config's fields; raises ModelFileError naming the field."""
    for name, limit in _INT_LIMITS.items():
        v = doc.get(name)
        if v is None and name in ("head_dim", "intermediate_size", "draft_vocab"):
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelFileError(f"{where}: {name} must be an integer, got {v!r}")
        if not 1 <= v <= limit:
            raise ModelFileError(f"{where}: {name} must be in 1..{limit}, got {v}")
    for name in ("rms_norm_eps", "rope_theta"):
        v = doc.get(name, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
            raise ModelFileError(f"{where}: {name} must be a positive number, got {v!r}")
    if doc.get("fusion", "dgf") not in ("dgf", "fc"):
        raise ModelFileError(f"{where}: fusion must be 'dgf' or 'fc', got {doc.get('fusion')!r}")
    if not isinstance(doc.get("target", {}), dict):
        raise ModelFileError(f"{where}: target must be an object")
    d, f = doc["n_embd"], doc.get("intermediate_size") or 3 * doc["n_embd"]
    params = doc["n_layer"] * (4 * d * d + 3 * d * f) + 3 * d * d
    if params > 20e9:
        raise ModelFileError(f"{where}: a draft of about {params / 1e9:.0f}B parameters is not a draft")


def load_draft(draft_dir: str | os.PathLike, target_path: str | os.PathLike, matrices=None) -> DraftModel:
    """The draft in ``draft_dir`` on the CPU, with the target's embedding and head attached."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(draft_dir)
    cfg = read_config(d)
    facts = read_facts(target_path)
    check_pairing(cfg, facts, str(d))
    embedding, head = matrices if matrices is not None else read_token_matrices(target_path)
    try:
        state = load_file(d / WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"cannot read {d / WEIGHTS_FILE}: {e}") from e
    d2t = state.get("d2t")
    if cfg.draft_vocab:
        if d2t is None or tuple(d2t.shape) != (cfg.draft_vocab,) or d2t.is_floating_point():
            raise ModelFileError(f"{d / WEIGHTS_FILE}: the draft-to-target map d2t is missing or not "
                                 f"{cfg.draft_vocab} integer ids")
        if int(d2t.min()) < 0 or int(d2t.max()) >= cfg.n_vocab:
            raise ModelFileError(f"{d / WEIGHTS_FILE}: d2t holds ids outside the vocabulary 0..{cfg.n_vocab - 1}")
    try:
        model = DraftModel(cfg, embedding, head, d2t if cfg.draft_vocab else None)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as e:  # shapes that do not match the config
        raise ModelFileError(f"{d / WEIGHTS_FILE} does not match its config: {str(e).splitlines()[0]}") from e
    if missing or unexpected:
        raise ModelFileError(f"{d / WEIGHTS_FILE} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def init_draft(target_path: str | os.PathLike, n_layer: int = 2, fusion: str = "dgf", draft_vocab: int | None = None,
               d2t: torch.Tensor | None = None, seed: int = 0, intermediate_size: int | None = None) -> DraftModel:
    """An untrained draft for a target (Xavier-initialised DGF, default-initialised layers)."""
    facts = read_facts(target_path)
    cfg = config_for_target(facts, n_layer=n_layer, fusion=fusion, draft_vocab=draft_vocab,
                            intermediate_size=intermediate_size)
    embedding, head = read_token_matrices(target_path)
    if draft_vocab and d2t is None:
        d2t = torch.arange(draft_vocab)  # until token frequencies are known: the first ids
    if not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise InvalidArgumentError(f"the seed must fit in 64 bits, got {seed}")
    torch.manual_seed(seed)
    return DraftModel(cfg, embedding, head, d2t)


def load_drafter(draft_dir: str | os.PathLike, target, device: str = "auto", dtype: str = "auto"):
    """A ready :class:`TreeDrafter` for a loaded :class:`Target` (``dtype``: see :func:`resolve_dtype`)."""
    from .tree import TreeDrafter, resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if dev.type == "cpu":  # draft and target take turns on the same cores: as many threads as the target
        torch.set_num_threads(target.n_threads)
    model = load_draft(draft_dir, target.path)
    log.info("draft %s: %d layers, %s fusion, head vocab %d, on %s in %s", draft_dir, model.cfg.n_layer,
             model.cfg.fusion, model.cfg.head_vocab, dev, torch_dtype)
    drafter = TreeDrafter(model, target.n_ctx + 1, dev, torch_dtype)
    drafter.warm_up()  # part of loading: the first generation is timed without PyTorch's first-call costs
    return drafter
