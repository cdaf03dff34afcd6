"""Kernel settings: which llama.cpp CPU kernels the target may use, and so whether a row's logits
depend on the batch it was computed in.

llama.cpp (the copy vendored in llama-cpp-python 0.3.36) picks kernels per call from the number of
rows in the batch:

- matmul: a lone row runs ``vec_dot``; 2+ rows of Q4_0/Q5_0/Q8_0/IQ4_NL weights llamafile's tinyBLAS;
  8+ rows of K-quant weights the tiled matmul; weights in a repacked layout (the "extra buffer
  types": Q4_0, Q4_K, IQ4_NL on x86, Q2_K with AVX-512) a GEMV per row below a block of 4 rows and a
  GEMM per block;
- attention: a lone row is split across threads along the KV cache past 512 cells (256 in use,
  the cache is padded); 64+ query rows are tiled.

Each kernel rounds differently, so the same row can get other logits in a batch of another size,
and a near-tie of the top two logits flips: greedy output with a draft then differs from greedy
output without one, and the same request can get two answers as the engine's learned tree sizes
change.

``invariant`` (the default) removes every one of those switches below 64 rows: the tiled matmul
from 64 rows only, a lone row's attention unsplit, and repacked layouts only for the types whose
GEMV and GEMM compute a row alike (all three need ``patches/llama-cpp-batch-invariant.patch``, which
``setup.sh`` applies; without it there are no repacked layouts, the tiled matmul is off and a lone
row carries a throw-away second row). Trees stay below 64 rows, so every generated token is
computed by one set of kernels. Prompt batches of 64+ rows keep the fast tiled
kernels: a prompt position then has one of two *row classes* (computed in a batch of 64+ rows or
not), and the engine reuses a cached prefix only where a cold prefill would give it the same class.
:mod:`dovetail_gguf.invariance` checks all of it once per machine, file and thread count.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import InvalidArgumentError

log = logging.getLogger(__name__)

TILE_ROWS = 64  # from this many rows on, llama.cpp's tiled attention (GGML_FA_TILE_Q) and, patched, tiled matmul
PATCH_MARK = b"GGML_CPU_TILED_MM_MIN_ROWS"  # a string only the patched libggml-cpu holds
REPACK_MARK = b"GGML_DOVETAIL_REPACK_K_AGREES"  # ... and only a patch whose repacked K-quant GEMVs agree with the GEMMs
# weight types llama.cpp repacks on x86 (ggml-cpu/repack.cpp; Q2_K with AVX-512 only), and those whose
# repacked GEMV and GEMM compute a row alike in the patched build: Q4_0 and IQ4_NL as shipped, Q4_K
# and Q2_K through the patch. MXFP4 is repacked too, with kernels not checked here.
REPACKED_X86 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q2_K", "MXFP4"})
REPACK_AGREES_X86 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q2_K"})


@dataclass(frozen=True)
class KernelMode:
    """Which llama.cpp CPU kernels a target may use."""

    name: str
    invariant: bool  # rows below TILE_ROWS are computed alike in any batch (see the module docstring)
    summary: str  # for --help and `dovetail info`


KERNEL_MODES: dict[str, KernelMode] = {m.name: m for m in (
    KernelMode("invariant", True, "a row's logits are the same in any batch: one answer per request"),
    KernelMode("fast", False, "llama.cpp's own kernel choice per batch size; near-ties can flip between runs"),
)}

DEFAULT_KERNELS = "invariant"


def kernel_mode(name: str) -> KernelMode:
    try:
        return KERNEL_MODES[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown kernel setting {name!r}; one of {', '.join(KERNEL_MODES)}") from None


@lru_cache(maxsize=None)
def _cpu_library_holds(mark: bytes) -> bool:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    for so in sorted(lib.glob("libggml-cpu*.so*")):
        try:
            if mark in so.read_bytes():
                return True
        except OSError:
            continue
    return False


def llama_cpp_patched() -> bool:
    """Whether the loaded llama.cpp carries patches/llama-cpp-batch-invariant.patch."""
    return _cpu_library_holds(PATCH_MARK)


def repack_invariant(quant_types) -> bool:
    """Whether the invariant kernels may load a file holding ``quant_types`` (GGUF type names) in
    llama.cpp's repacked layouts: on x86, with the patch, when every type it would repack computes a
    row alike in its GEMV and GEMM, and without llama.cpp's AMX kernels (which take other types, by
    row count too). The invariance probe checks the result."""
    from .llama_runtime import amx_kernels_built

    if platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_library_holds(REPACK_MARK):
        return False
    if amx_kernels_built():
        return False
    return not (set(quant_types) & REPACKED_X86) - REPACK_AGREES_X86


def environment(mode: KernelMode) -> dict[str, str]:
    """The llama.cpp environment switches ``mode`` needs."""
    if not mode.invariant:
        return {}
    if llama_cpp_patched():
        return {"GGML_CPU_TILED_MM_MIN_ROWS": str(TILE_ROWS), "GGML_CPU_FA_SPLIT_KV": "0"}
    return {"GGML_CPU_TILED_MM": "0"}


SWITCHES = ("GGML_CPU_FA_SPLIT_KV", "GGML_CPU_TILED_MM", "GGML_CPU_TILED_MM_MIN_ROWS")
_process_env: dict[str, str] | None = None  # what this process's llama.cpp was given (read once, at its first matmul)


def effective_environment(mode: KernelMode) -> dict[str, str]:
    """The switches a process whose first target uses ``mode`` runs with: ``mode``'s, a user's own
    setting of a switch winning."""
    env = {k: os.environ[k] for k in SWITCHES if k in os.environ}
    return dict(sorted({**environment(mode), **env}.items()))


def apply_environment(mode: KernelMode) -> dict[str, str]:
    """Set llama.cpp's switches for ``mode`` before its first matmul in this process; returns the
    switches in force. llama.cpp reads them once per process: a later target asking for others keeps
    the first ones (the invariance probe then measures what they give), and a user's own setting of
    a switch wins."""
    global _process_env
    if _process_env is None:
        _process_env = effective_environment(mode)
        os.environ.update(_process_env)
    elif mode.invariant and any(_process_env.get(k) != v for k, v in environment(mode).items()):
        log.warning("llama.cpp in this process already runs with %s; the invariant kernels keep them",
                    _process_env or "its defaults")
    return dict(_process_env)
