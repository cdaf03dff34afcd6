"""Load on `dovetail serve`: many concurrent clients, some of whom give up, on loopback.

    python benchmarks/server_load.py --clients 200 --disconnects 20 --max-queue 64

Prints how many requests got 200, 429 or something else, latency percentiles of
the completed ones, whether every greedy answer equals its prompt's own, and the
server's queue after the storm. Nothing here is a test; tests/test_server_load.py
asserts the properties.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
import time

import httpx
import numpy as np
import uvicorn

from dovetail_gguf import Dovetail
from dovetail_gguf.server import create_app
from dovetail_gguf.target import TargetConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client, base, body, give_up_after: float | None):
    t0 = time.perf_counter()

    async def call():
        if not body["stream"]:
            r = await client.post(base + "/v1/completions", json=body)
            return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else None)
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, None
            parts = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    parts.append(json.loads(line[6:])["choices"][0]["text"])
            return 200, "".join(parts)

    try:
        if give_up_after is not None:
            await asyncio.wait_for(call(), timeout=give_up_after)
            return "finished-before-giving-up", None, time.perf_counter() - t0
        status, text = await call()
        return status, text, time.perf_counter() - t0
    except asyncio.TimeoutError:
        return "gave-up", None, time.perf_counter() - t0


async def storm(base, args):
    prompts = [f"Write the number {i} in words:" for i in range(10)]
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.clients + 10)) as client:
        expected = {}
        for p in prompts:
            r = await client.post(base + "/v1/completions", json={"prompt": p, "max_tokens": args.max_tokens, "temperature": 0})
            expected[p] = r.json()["choices"][0]["text"]
        quitters = set(rng.sample(range(args.clients), args.disconnects))
        bodies = [{"prompt": prompts[i % 10], "max_tokens": args.max_tokens, "temperature": 0, "stream": i % 2 == 1}
                  for i in range(args.clients)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, base, b, rng.uniform(0.05, 1.0) if i in quitters else None)
                                         for i, b in enumerate(bodies)))
        wall = time.perf_counter() - t0
        health = (await client.get(base + "/health")).json()
    return bodies, results, expected, wall, health


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--disconnects", type=int, default=20, help="clients that give up after a random 0.05-1 s")
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    dt = Dovetail(None, False, target_config=TargetConfig(n_ctx=1024, n_threads=2))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(dt, "smol", max_queue=args.max_queue), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    bodies, results, expected, wall, health = asyncio.run(storm(f"http://127.0.0.1:{port}", args))
    server.should_exit = True
    counts: dict = {}
    for status, _, _ in results:
        counts[status] = counts.get(status, 0) + 1
    done = [(b, text, sec) for b, (status, text, sec) in zip(bodies, results) if status == 200]
    lat = np.array([sec for _, _, sec in done])
    wrong = sum(text != expected[b["prompt"]] for b, text, _ in done)
    print(json.dumps({"clients": args.clients, "disconnects_injected": args.disconnects, "max_queue": args.max_queue,
                      "outcomes": {str(k): v for k, v in counts.items()}, "wall_seconds": round(wall, 2),
                      "latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                      "latency_p99_s": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
                      "wrong_answers": int(wrong), "health_after": health}, indent=1))


if __name__ == "__main__":
    main()
