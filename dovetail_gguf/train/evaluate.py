"""τ of a trained draft, measured through the real engine on held-out prompts."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from ..types import TreeConfig

log = logging.getLogger(__name__)


def measure_tau(target_path: str | os.PathLike, draft_dir: str | os.PathLike, prompts: Sequence[np.ndarray | str],
                max_tokens: int = 128, tree: TreeConfig | None = None, n_threads: int | None = None,
                device: str = "auto", progress: bool = True) -> dict:
    """Greedy generation with the fixed ``tree`` on every prompt (token ids or raw text); τ = emitted tokens / rounds.

    Returns τ over all prompts together, per-prompt τ, and the counts behind them.
    """
    from tqdm import tqdm

    from ..api import Dovetail
    from ..target import TargetConfig

    cfg = TargetConfig(n_ctx=4096, n_threads=n_threads)
    tree = tree or TreeConfig()
    per_prompt, tokens, rounds = [], 0, 0
    with Dovetail(target_path, draft_dir, device=device, tree=tree, target_config=cfg, adaptive=False) as dt:
        for p in tqdm(prompts, desc="measuring τ", disable=not progress):
            ids = dt.tokenize_prompt(p) if isinstance(p, str) else [int(t) for t in p]
            stats = dt.generate_tokens(ids, max_tokens=max_tokens).stats
            per_prompt.append(stats.mean_accepted_tokens)
            tokens += stats.accepted_tokens
            rounds += stats.rounds
    tau = tokens / rounds if rounds else 0.0
    log.info("τ = %.3f over %d prompts (%d rounds)", tau, len(prompts), rounds)
    return {"tau": tau, "per_prompt": per_prompt, "accepted_tokens": tokens, "rounds": rounds,
            "n_prompts": len(prompts), "max_tokens": max_tokens,
            "tree": {"tokens": tree.tokens, "depth": tree.depth, "topk": tree.topk}}
