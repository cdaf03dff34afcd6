"""LLaMA-family checkpoints to GGUF, one tensor at a time.

Sources: Hugging Face folders (``LlamaForCausalLM`` / ``MistralForCausalLM``,
safetensors, sharded or not, or ``pytorch_model*.bin``) and Meta's original
layout (``consolidated.*.pth`` + ``params.json`` + ``tokenizer.model``).

The GGUF header (metadata and tensor directory) is written first from shapes
alone; tensor data then streams through, so peak memory is about one tensor.
The output goes to a temporary file that is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dovetail_gguf.errors import DovetailError, InvalidArgumentError, ModelFileError
from dovetail_gguf.outputs import check_output_file

log = logging.getLogger(__name__)

DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_QUANT_TYPES = ("q4_0", "q4_k_m", "q5_k_m", "q6_k")
OUT_TYPES = DIRECT_TYPES + LLAMA_QUANT_TYPES
SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass
class HParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    n_ctx: int
    tied: bool
    name: str
    rope_scaling: dict | None = None
    permute_qk: bool = True  # HF stores Q/K rows in rotate-half order; GGUF wants them interleaved


@dataclass
class Checkpoint:
    """Hyperparameters plus a getter per source tensor (GGUF name -> loader)."""

    hp: HParams
    tensors: dict[str, Callable[[], "np.ndarray"]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


# ------------------------------------------------------------------------------ sources
HF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
META_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}
META_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}


def _gguf_name(src: str, top: dict, layer: dict, prefix: str) -> str | None:
    if src in top:
        return top[src]
    if src.startswith(prefix):
        idx, _, rest = src[len(prefix):].partition(".")
        if idx.isdigit() and rest in layer:
            return f"blk.{idx}.{layer[rest]}"
    return None


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.float32).numpy()


def read_hf(src: Path) -> Checkpoint:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(f"{src} has no config.json (is it a Hugging Face checkpoint folder?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelFileError(f"{cfg_path} is not valid JSON: {e}") from e
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    archs = cfg.get("architectures") or [by_type.get(cfg.get("model_type", "?"), cfg.get("model_type", "?"))]
    if archs[0] not in SUPPORTED_ARCHS:
        raise InvalidArgumentError(f"unsupported architecture {archs[0]}: this converter handles {', '.join(SUPPORTED_ARCHS)}")
    # transformers 5 writes rope settings as one "rope_parameters" dict; older versions use
    # "rope_theta" and "rope_scaling"
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    try:
        n_head = int(cfg["num_attention_heads"])
        n_embd = int(cfg["hidden_size"])
        hp = HParams(
            n_vocab=int(cfg["vocab_size"]), n_embd=n_embd, n_layer=int(cfg["num_hidden_layers"]), n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head), n_ff=int(cfg["intermediate_size"]),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head), rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta), n_ctx=int(cfg.get("max_position_embeddings", 4096)),
            tied=bool(cfg.get("tie_word_embeddings", False)), name=src.name, rope_scaling=scaling,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{cfg_path} lacks a needed field: {e}") from e
    check_hparams(hp, cfg_path)
    ck = Checkpoint(hp)
    st_files = sorted(src.glob("*.safetensors"))
    bin_files = sorted(src.glob("pytorch_model*.bin"))
    if st_files:
        from safetensors import SafetensorError, safe_open

        for f in st_files:
            try:
                handle = safe_open(str(f), framework="pt")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelFileError(f"corrupt or truncated safetensors file {f.name}: {e}") from e
            for name in names:
                g = _gguf_name(name, HF_NAMES, HF_LAYER_NAMES, "model.layers.")
                if g is None:
                    continue
                ck.shapes[g] = tuple(handle.get_slice(name).get_shape())
                ck.tensors[g] = (lambda h=handle, n=name, f=f: _load_st(h, n, f))
    elif bin_files:
        import torch

        for f in bin_files:
            try:
                state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises several types for damaged files
                raise ModelFileError(f"cannot read {f.name}: {e}") from e
            for name, t in state.items():
                g = _gguf_name(name, HF_NAMES, HF_LAYER_NAMES, "model.layers.")
                if g is not None:
                    ck.shapes[g] = tuple(t.shape)
                    ck.tensors[g] = (lambda t=t: _torch_to_numpy(t))
    else:
        raise ModelFileError(f"{src} has no weights (*.safetensors or pytorch_model*.bin)")
    return ck


def _load_st(handle, name: str, f: Path) -> np.ndarray:
    from safetensors import SafetensorError

    try:
        return _torch_to_numpy(handle.get_tensor(name))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelFileError(f"cannot read tensor {name} from {f.name}: {e}") from e


def read_meta(src: Path) -> Checkpoint:
    import torch

    params = json.loads((src / "params.json").read_text())
    shards = sorted(src.glob("consolidated.*.pth"))
    if not shards:
        raise ModelFileError(f"{src} has params.json but no consolidated.*.pth")
    states = []
    for f in shards:
        try:
            states.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:
            raise ModelFileError(f"cannot read {f.name}: {e}") from e
    dim, n_head = int(params["dim"]), int(params["n_heads"])
    first = states[0]
    w1_rows = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in states)
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:
        vocab = sum(s["output.weight"].shape[0] for s in states)
    hp = HParams(
        n_vocab=vocab, n_embd=dim, n_layer=int(params["n_layers"]), n_head=n_head,
        n_head_kv=int(params.get("n_kv_heads") or n_head), n_ff=w1_rows, head_dim=dim // n_head,
        rms_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
        n_ctx=int(params.get("max_seq_len", 4096)), tied=False, name=src.name, permute_qk=False,
    )
    check_hparams(hp, src / "params.json")
    ck = Checkpoint(hp)
    # model-parallel shards split column-parallel weights along rows, row-parallel ones along columns
    col_split = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
    for name in first:
        g = _gguf_name(name, META_NAMES, META_LAYER_NAMES, "layers.")
        if g is None:
            continue
        parts = [s[name] for s in states]
        if len(parts) == 1 or parts[0].ndim == 1:
            ck.shapes[g] = tuple(parts[0].shape)
            ck.tensors[g] = (lambda t=parts[0]: _torch_to_numpy(t))
        else:
            axis = 1 if name.endswith(col_split) else 0
            ck.shapes[g] = _cat_shape(parts, axis)
            ck.tensors[g] = (lambda p=parts, a=axis: _torch_to_numpy(torch.cat(p, dim=a)))
    return ck


def _cat_shape(parts, axis: int) -> tuple[int, ...]:
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return tuple(shape)


# ------------------------------------------------------------------------------ checks and transforms
def expected_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes = {"token_embd.weight": (hp.n_vocab, hp.n_embd), "output_norm.weight": (hp.n_embd,)}
    if not hp.tied:
        shapes["output.weight"] = (hp.n_vocab, hp.n_embd)
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (hp.n_embd,), p + "attn_q.weight": (q, hp.n_embd), p + "attn_k.weight": (kv, hp.n_embd),
            p + "attn_v.weight": (kv, hp.n_embd), p + "attn_output.weight": (hp.n_embd, q), p + "ffn_norm.weight": (hp.n_embd,),
            p + "ffn_gate.weight": (hp.n_ff, hp.n_embd), p + "ffn_up.weight": (hp.n_ff, hp.n_embd),
            p + "ffn_down.weight": (hp.n_embd, hp.n_ff),
        })
    return shapes


def check_shapes(ck: Checkpoint) -> None:
    want = expected_shapes(ck.hp)
    if ck.hp.tied:
        ck.shapes.pop("output.weight", None)
        ck.tensors.pop("output.weight", None)
    missing = [n for n in want if n not in ck.shapes]
    if missing:
        raise ModelFileError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, shape in want.items():
        if tuple(ck.shapes[name]) != shape:
            raise ModelFileError(f"tensor {name} has shape {tuple(ck.shapes[name])}, but config.json implies {shape}")


def check_hparams(hp: HParams, where) -> None:
    """Refuse hyperparameters that llama.cpp would abort on (or compute nonsense with) later."""
    for name in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "head_dim", "n_ctx"):
        if getattr(hp, name) < 1:
            raise ModelFileError(f"{where}: {name} must be positive, got {getattr(hp, name)}")
    if hp.n_head % hp.n_head_kv:
        raise ModelFileError(f"{where}: num_attention_heads {hp.n_head} is not a multiple of num_key_value_heads {hp.n_head_kv}")
    if hp.head_dim % 2:
        raise ModelFileError(f"{where}: the head size {hp.head_dim} must be even for RoPE")
    if not (math.isfinite(hp.rms_eps) and hp.rms_eps > 0):
        raise ModelFileError(f"{where}: rms_norm_eps must be a positive number, got {hp.rms_eps}")
    if not (math.isfinite(hp.rope_theta) and hp.rope_theta > 0):
        raise ModelFileError(f"{where}: rope_theta must be a positive number, got {hp.rope_theta}")


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    rs = hp.rope_scaling
    factor, lo, hi = float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------ writing
def _plan_type(name: str, shape: tuple[int, ...], outtype: str):
    """(numpy dtype for add_tensor_info, GGML raw type or None) of one tensor."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return np.float32, None
    if outtype == "f16":
        return np.float16, None
    if outtype == "bf16":
        return np.uint8, Q.BF16
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return np.uint8, Q.Q8_0
    return np.float16, None  # q8_0 of a row not divisible by 32: keep f16


def write_gguf(ck: Checkpoint, src: Path, out: Path, outtype: str, progress: bool = True) -> None:
    import gguf
    from gguf.quants import quantize
    from tqdm import tqdm

    from .vocab import add_vocab

    hp = ck.hp
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(hp.name)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.n_vocab)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(ftype)
    rs = hp.rope_scaling or {}
    rs_type = rs.get("rope_type") or rs.get("type")
    extra: dict[str, np.ndarray] = {}
    if rs_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif rs_type == "llama3":
        extra["rope_freqs.weight"] = llama3_rope_factors(hp)
    elif rs_type not in (None, "default"):
        raise InvalidArgumentError(f"unsupported rope_scaling type {rs_type!r} (supported: linear, llama3)")
    kind = add_vocab(w, src, hp.n_vocab)
    log.info("tokenizer: %s", kind)

    order = list(expected_shapes(hp))
    plan = {}
    for name in order:
        shape = tuple(ck.shapes[name])
        dtype, raw = _plan_type(name, shape, outtype)
        if raw is not None:
            byte_shape = quantize(np.zeros((1, shape[-1]), np.float32), raw).shape[-1]
            w.add_tensor_info(name, (*shape[:-1], byte_shape), np.dtype(np.uint8), int(np.prod(shape[:-1])) * byte_shape, raw)
        else:
            w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        plan[name] = (dtype, raw)
    for name, arr in extra.items():
        w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name in tqdm(order, desc=f"convert -> {outtype}", unit="tensor", disable=not progress):
        arr = ck.tensors[name]()
        if hp.permute_qk and name.endswith("attn_q.weight"):
            arr = permute_rope_rows(arr, hp.n_head)
        elif hp.permute_qk and name.endswith("attn_k.weight"):
            arr = permute_rope_rows(arr, hp.n_head_kv)
        dtype, raw = plan[name]
        arr = quantize(arr, raw) if raw is not None else arr.astype(dtype)
        w.write_tensor_data(np.ascontiguousarray(arr))
        del arr
    for arr in extra.values():
        w.write_tensor_data(arr)
    w.close()


def llama_quantize(src_gguf: Path, out: Path, outtype: str, threads: int = 0, allow_requantize: bool = False) -> None:
    """llama.cpp's quantizer: ``src_gguf`` (F32/F16/BF16, or a quantized file with ``allow_requantize``)
    to ``outtype`` at ``out``."""
    import llama_cpp

    from dovetail_gguf.llama_runtime import init_backend

    init_backend()
    ftype = {"q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
             "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}[outtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(out).encode(), params)
    if rc != 0:
        raise DovetailError(f"llama.cpp's quantizer failed with code {rc}")


def convert(src: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", force: bool = False,
            progress: bool = True) -> Path:
    """Convert a checkpoint folder to a GGUF file at ``out``; nothing is left behind on failure."""
    outtype = outtype.lower()
    if outtype not in OUT_TYPES:
        raise InvalidArgumentError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUT_TYPES)}")
    src_p, out_p = Path(src), Path(out)
    if not src_p.exists():
        raise ModelFileError(f"checkpoint folder not found: {src_p}")
    if not src_p.is_dir() or not os.access(src_p, os.R_OK | os.X_OK):
        raise ModelFileError(f"not a readable folder: {src_p}")
    check_output_file(out_p, force)
    ck = read_meta(src_p) if (src_p / "params.json").is_file() and not (src_p / "config.json").is_file() else read_hf(src_p)
    check_shapes(ck)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_p.parent.glob(f".{glob.escape(out_p.name)}.*.part"):  # left by a run killed with SIGKILL
        log.info("removing %s, left by an interrupted conversion", stale)
        stale.unlink(missing_ok=True)
    with _sigterm_as_interrupt():
        return _convert_to(ck, src_p, out_p, outtype, progress)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while converting, so the partial files are removed as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _convert_to(ck, src_p: Path, out_p: Path, outtype: str, progress: bool) -> Path:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_p.name}.", suffix=".part", dir=out_p.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    stage = None
    try:
        if outtype in DIRECT_TYPES:
            write_gguf(ck, src_p, tmp, outtype, progress)
        else:
            fd, stage_name = tempfile.mkstemp(prefix=f".{out_p.name}.", suffix=".f16.part", dir=out_p.parent)
            os.close(fd)
            stage = Path(stage_name)
            write_gguf(ck, src_p, stage, "f16", progress)
            llama_quantize(stage, tmp, outtype)
        os.replace(tmp, out_p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if stage is not None:
            stage.unlink(missing_ok=True)
    return out_p
