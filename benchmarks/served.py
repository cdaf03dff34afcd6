"""``dovetail serve`` for a benchmark: a subprocess on a free loopback port, ready once /health answers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from typing import Iterator

import httpx


@contextlib.contextmanager
def served(args: list[str], start_s: float = 300) -> Iterator[str]:
    """Runs ``dovetail serve ARGS`` (this Python, this checkout) and yields its base URL; stops it on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dovetail_gguf", "serve", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_s
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(proc.stderr.read())
            if time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
