"""llama.cpp's own self-speculation, as a bench system: ``llama-server --spec-type ngram-*``.

Bench-only. :func:`build_llama_server` compiles ``llama-server`` once from the llama.cpp source that
llama-cpp-python vendors (the same version the target runs on, stock: without the batch-invariance
patch) into the cache folder; :class:`LlamaServerSystem` runs it on a loopback port with the
settings llama.cpp's docs/speculative.md gives for each n-gram mode and times requests through its
``/completion`` API from its own per-request timings (prompt processing excluded, as for every
other bench system).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import DovetailError
from .models import cache_dir

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built (the version setup.sh installs)

# docs/speculative.md's sample settings per mode (vendored llama.cpp)
PEER_MODES: dict[str, list[str]] = {
    "plain": [],  # no speculation: llama.cpp's own decoding, as shipped
    "ngram-mod": ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "24", "--spec-ngram-mod-n-min", "48",
                  "--spec-ngram-mod-n-max", "64"],
    "ngram-map-k4v": ["--spec-type", "ngram-map-k4v", "--spec-ngram-map-k4v-size-n", "8", "--spec-ngram-map-k4v-size-m",
                      "8", "--spec-ngram-map-k4v-min-hits", "2", "--spec-draft-n-max", "64"],
    "ngram-simple": ["--spec-type", "ngram-simple", "--spec-draft-n-max", "64"],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def build_llama_server(progress: bool = True) -> Path:
    """``llama-server`` built for this CPU from llama-cpp-python's vendored llama.cpp (cached; the
    first call downloads the sdist from the package index and compiles, about 10 minutes on 2 cores)."""
    key = hashlib.sha256(f"{LLAMA_CPP_PYTHON}|{_cpu_flags()}".encode()).hexdigest()[:16]
    home = cache_dir() / f"llama-server-{key}"
    binary = home / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None and not _pip_cmake():
        raise DovetailError("building llama-server needs cmake: pip install cmake")
    log.warning("building llama-server from llama-cpp-python %s's llama.cpp (once, about 10 minutes)", LLAMA_CPP_PYTHON)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", work], check=True)
        sdist = next(Path(work).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = Path(work) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        build = Path(work) / "build"
        amx_off = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as setup.sh (GCC 12 miscompiles AMX kernels)
        cmake = shutil.which("cmake") or _pip_cmake()
        out = None if progress else subprocess.DEVNULL
        subprocess.run([cmake, "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DCMAKE_C_FLAGS={amx_off}", f"-DCMAKE_CXX_FLAGS={amx_off}"],
                       check=True, stdout=out)
        subprocess.run([cmake, "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=out)
        staged = home.with_name(home.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        (staged / "bin").mkdir(parents=True)
        shutil.copy2(build / "bin" / "llama-server", staged / "bin" / "llama-server")
        shutil.rmtree(home, ignore_errors=True)
        staged.rename(home)  # only a complete build reaches the cache
    return binary


def _pip_cmake() -> str | None:
    exe = Path(sys.executable).parent / "cmake"
    return str(exe) if exe.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerSystem:
    """One ``llama-server`` process with one n-gram speculation mode, driven over HTTP."""

    def __init__(self, binary: Path, model: str | os.PathLike, mode: str, n_ctx: int, threads: int):
        import httpx

        if mode not in PEER_MODES:
            raise DovetailError(f"unknown llama-server mode {mode!r}; one of {', '.join(PEER_MODES)}")
        from .kernels import SWITCHES

        self.mode, self.port = mode, _free_port()
        env = {k: v for k, v in os.environ.items() if k not in SWITCHES}  # its own kernel choice, as shipped
        self._log = tempfile.TemporaryFile()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-c", str(n_ctx),
             "-t", str(threads), "-tb", str(threads), "-np", "1", "--no-webui", *PEER_MODES[mode]],
            stdout=subprocess.DEVNULL, stderr=self._log, env=env)  # a pipe nobody reads would fill and stall it
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self.close()
                raise DovetailError(f"llama-server ({mode}) exited: {tail}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            self.close()
            raise DovetailError(f"llama-server ({mode}) did not start")
        self._http = httpx.Client(timeout=600)

    def run(self, prompt_tokens: list[int], max_tokens: int) -> tuple[str, int, float]:
        """Greedy completion of ``prompt_tokens``: (text, tokens generated, decode seconds by its own timings)."""
        r = self._http.post(self.base + "/completion", json={
            "prompt": list(map(int, prompt_tokens)), "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
            "cache_prompt": False, "seed": 0, "ignore_eos": False})
        r.raise_for_status()
        doc = r.json()
        timings = doc["timings"]
        return doc["content"], int(timings["predicted_n"]), float(timings["predicted_ms"]) / 1000.0

    def _log_tail(self, n: int = 2000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
