"""Process-wide llama.cpp set-up: backend init, log routing, CPU facts, the AMX guard.

llama.cpp built with ``-march=native`` by GCC 12 crashes in its AMX kernels on
CPUs that have AMX (upstream llama.cpp #20824). Building with
``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`` (what ``setup.sh`` does) avoids
it at full speed; for a llama.cpp built otherwise we find out once, in a child
process, whether a decode survives, and if not load with
``use_extra_bufts=False`` (about 25% slower, but no crash).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from .models import cache_dir

log = logging.getLogger(__name__)

_PROBE_SCRIPT = r"""
import sys, llama_cpp
llama_cpp.llama_backend_init()
import llama_cpp._logger as lg; lg.set_verbose(False)
mp = llama_cpp.llama_model_default_params()
m = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), mp)
cp = llama_cpp.llama_context_default_params(); cp.n_ctx = 64; cp.n_batch = 8; cp.n_ubatch = 8
ctx = llama_cpp.llama_init_from_model(m, cp)
toks = (llama_cpp.llama_token * 4)(0, 0, 0, 0)
rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(toks, 4))
sys.exit(0 if rc == 0 else 3)
"""


@lru_cache(maxsize=1)
def init_backend() -> None:
    """Initialise llama.cpp once and route its log output through ``logging``."""
    import llama_cpp
    import llama_cpp._logger as llama_logger

    llama_cpp.llama_backend_init()
    # llama-cpp-python prints llama.cpp's log to stderr; keep it for DEBUG only.
    llama_logger.set_verbose(logging.getLogger("llama_cpp").isEnabledFor(logging.DEBUG))


def physical_cores() -> int:
    """Physical cores this process may run on (the best llama.cpp thread count)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        phys = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
                cores.add((phys, core))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))


def cpu_has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kind() -> str:
    """The CPU's vendor and widest matrix/vector extension llama.cpp uses, as in "AMD EPYC, AVX2":
    the machine kind performance figures are reported by."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    model = cpu_model()
    vendor = next((v for v in ("EPYC", "Xeon", "Ryzen", "Core") if v in model), model)
    vendor = {"EPYC": "AMD EPYC", "Ryzen": "AMD Ryzen", "Xeon": "Intel Xeon", "Core": "Intel Core"}.get(vendor, vendor)
    ext = next((name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                        ("asimd", "NEON")) if flag in flags), "no SIMD")
    return f"{vendor}, {ext}"


@lru_cache(maxsize=None)
def build_id() -> str:
    """llama-cpp-python's version and its shared libraries' sizes and times: changes with every rebuild."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    stamps = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in lib.glob("*.so*"))
    return f"{llama_cpp.__version__}|" + "|".join(stamps)


@lru_cache(maxsize=None)
def extra_buffers_safe(model_path: str) -> bool:
    """Whether llama.cpp's extra (repacking/AMX) buffer types can be used on this CPU.

    True without AMX. With AMX, the answer comes from a child process that loads
    the model with default settings and decodes a few tokens; it is cached per
    llama.cpp build in ~/.cache/dovetail-gguf.
    """
    if not cpu_has_amx() or not amx_kernels_built():
        return True  # no AMX here, or llama.cpp was built without its AMX kernels
    override = os.environ.get("DOVETAIL_EXTRA_BUFTS")
    if override in ("0", "1"):
        return override == "1"
    cache = cache_dir() / "amx_probe.json"
    build = build_id()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("build") == build:
            return bool(cached["safe"])
    except (OSError, ValueError, KeyError):
        pass
    log.info("probing llama.cpp's AMX kernels on this CPU (once per llama.cpp build)")
    proc = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, model_path], capture_output=True, timeout=300)
    safe = proc.returncode == 0
    if not safe:
        log.warning(
            "this llama.cpp build crashes in its AMX kernels on this CPU (exit %d); loading with "
            "use_extra_bufts=False, about 25%% slower. Rebuild llama-cpp-python with AMX code generation "
            "off (see README) for full speed.",
            proc.returncode,
        )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"build": build, "safe": safe}))
        tmp.replace(cache)
    except OSError:
        pass
    return safe


def amx_kernels_built() -> bool:
    """Whether this llama.cpp was compiled with its AMX kernels (an extra buffer type of their own)."""
    return "AMX_INT8 = 1" in system_info()


def system_info() -> str:
    import llama_cpp

    init_backend()
    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()
