"""The law tests hold the sampler to: the whole distribution its chain defines."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dovetail_gguf.accept import SamplingParams, adjust_logits, candidates


def target_distribution(logits: np.ndarray, params: SamplingParams, recent: Sequence[int] = ()) -> np.ndarray:
    """The whole distribution the sampler draws from, built from the chain's own steps (the sampler never builds it)."""
    n = params.penalty_window
    window = list(recent)[-n:] if n else []
    x = adjust_logits(np.asarray(logits, dtype=np.float32), params, np.asarray(window, dtype=np.int64))
    p = np.zeros(x.shape[0])
    if params.greedy:
        p[int(np.argmax(x))] = 1.0
        return p
    ids, w = candidates(x, params)
    if ids is None:
        p[:] = w
    else:
        p[ids] = w
    return p / p.sum()
