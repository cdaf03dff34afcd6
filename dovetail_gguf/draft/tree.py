"""Drafting a dynamic token tree (EAGLE-2 style) with a Dovetail draft model.

One round:
1. the new committed pairs (target feature of position t-1, token at t) go
   through the draft in one forward and stay in its KV cache; the last pair is
   the root (the token the target produced last);
2. depth by depth, the ``topk`` best frontier nodes (by cumulative draft
   log-probability) are expanded in one batched forward each, attending to the
   committed rows and to their own ancestors only (a tree mask);
3. of every candidate produced, the ``tokens`` best by cumulative
   log-probability form the tree (a child never scores above its parent, so
   the selection keeps every selected node's ancestors).

The tree rows are scratch: the cache is trimmed back to the committed pairs
after each round. Only the selected tokens, parents and scores leave the
device; only the accepted hidden states come to it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import ContextFullError, InvalidArgumentError
from ..types import DraftTree, TreeConfig
from ..plan import order_best_first  # noqa: F401  (also imported from here)
from .model import DraftKVCache, DraftModel

log = logging.getLogger(__name__)

MAX_TREE_DEPTH = 64


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16/fp16 on a GPU, fp32 on the CPU; else 'fp32', 'bf16' or 'fp16'.

    On a CPU, bf16 halves the bytes each draft step reads (benchmarks/draft_step.py measures it).
    """
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise InvalidArgumentError(f"draft dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class _Pool:
    """Every candidate of one drafting round, flat: level 1 holds k entries, each later level k * k."""

    def __init__(self, k: int, depth: int, device: torch.device):
        capacity = k + (depth - 1) * k * k
        self.tokens = torch.empty(capacity, dtype=torch.long, device=device)  # draft-vocabulary ids
        self.scores = torch.empty(capacity, dtype=torch.float32, device=device)  # cumulative log-probability
        self.parents = torch.empty(capacity, dtype=torch.long, device=device)  # pool index, -1 below the root
        self.depths = torch.empty(capacity, dtype=torch.long, device=device)
        self.size = 0

    def add(self, tokens: torch.Tensor, scores: torch.Tensor, parents: torch.Tensor, depth: int) -> int:
        """Append one level of candidates; returns the pool index of its first entry."""
        lo, n = self.size, tokens.shape[0]
        self.tokens[lo : lo + n] = tokens
        self.scores[lo : lo + n] = scores
        self.parents[lo : lo + n] = parents
        self.depths[lo : lo + n] = depth
        self.size += n
        return lo


class TreeDrafter:
    """A draft model with its KV cache on a device, proposing trees for the engine."""

    def __init__(self, model: DraftModel, max_positions: int, device: torch.device, dtype: torch.dtype | None = None):
        self.device = device
        self.dtype = dtype or default_dtype(device)
        self.model = model.to_inference(device, self.dtype)
        self.max_tree_slots = MAX_TREE_DEPTH * 64  # (depth - 1) * topk for any accepted TreeConfig (topk <= 64)
        # pairs it can hold: tree nodes sit up to MAX_TREE_DEPTH positions past the last pair, inside the RoPE table
        self.max_positions = max(0, min(max_positions, model.cfg.max_positions - 1 - MAX_TREE_DEPTH))
        self.cache = DraftKVCache(model.cfg, self.max_positions + self.max_tree_slots, device, self.dtype)
        self.offset = 0  # pairs skipped before the cache's first row (see skip_to)
        self._pin = device.type == "cuda"
        self.step_ms = 0.0  # measured by warm_up()

    def warm_up(self) -> None:
        """Throw-away rounds, so the first real one does not pay PyTorch's first-call costs; the second
        one's time per level is ``step_ms``, the policy's first guess of the draft's cost."""
        import time

        d = self.model.cfg.n_embd
        for _ in range(2):
            t0 = time.perf_counter()
            self.propose(np.zeros((2, d), dtype=np.float32), np.zeros(2, dtype=np.int32), TreeConfig(2, 2, 1))
            self.step_ms = 1000 * (time.perf_counter() - t0) / 2
            self.trim(0)

    def peak_memory_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def trim(self, n_pairs: int) -> int:
        keep = n_pairs - self.offset
        if keep < 0:
            self.cache.trim(0)
            self.offset = 0
        else:
            self.cache.trim(min(keep, self.cache.length))
        return self.offset + self.cache.length

    def skip_to(self, n_pairs: int) -> int:
        """Hold nothing, and take the next pairs from position ``n_pairs`` on: the draft then attends
        to a window of the context (the engine skips most of a long prompt's features, so its prefill
        needs no outputs, and no LM head, for them)."""
        self.cache.trim(0)
        self.offset = n_pairs
        return n_pairs

    def _to_device(self, features: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, dtype=self.dtype, non_blocking=self._pin)

    @torch.inference_mode()
    def propose(self, features: np.ndarray, tokens: np.ndarray, tree: TreeConfig) -> DraftTree:
        """Commit the new pairs (``features`` [m, d], ``tokens`` [m], the last one the root) and draft a tree."""
        model, cache, dev = self.model, self.cache, self.device
        m = int(tokens.shape[0])
        start, off = cache.length, self.offset
        if off + start + m > self.max_positions:
            raise ContextFullError(f"the draft holds at most {self.max_positions} positions; decode plainly past them")
        if tree.depth > MAX_TREE_DEPTH:
            raise InvalidArgumentError(f"tree depth {tree.depth} exceeds {MAX_TREE_DEPTH}")
        # 1. commit the new pairs; row r holds the pair of position r + 1
        rows = torch.arange(start, start + m, device=dev)
        cache.set_used(start + m)
        mask = torch.arange(start + m, device=dev)[None, :] <= rows[:, None]  # [m, start + m] causal
        out = model(self._to_device(features)[None], torch.from_numpy(tokens.astype(np.int64)).to(dev)[None],
                    (off + rows + 1)[None], mask, cache, rows)  # [1, m, d]
        cache.length = committed = start + m
        # 2. expand the best k frontier nodes level by level; the pool keeps every candidate
        k = min(tree.topk, model.cfg.head_vocab)
        pool = _Pool(k, tree.depth, dev)
        logp = torch.log_softmax(model.logits(out[0, -1:]).float(), dim=-1)  # [1, V']
        top_p, top_i = logp.topk(k, dim=-1)  # [1, k]
        first = pool.add(top_i[0], top_p[0], torch.full((k,), -1, device=dev, dtype=torch.long), depth=1)
        frontier = torch.arange(first, first + k, device=dev)  # [k] pool indices of the nodes to expand next
        frontier_feat = out[0, -1:].expand(k, -1)  # [k, d]: the parent's predicted feature per frontier node
        anc = torch.ones(k, 0, dtype=torch.bool, device=dev)  # [k, tree slots so far]: ancestors of each frontier node
        for depth in range(1, tree.depth):
            n_slots = anc.shape[1]
            slots = torch.arange(committed + n_slots, committed + n_slots + k, device=dev)  # [k] scratch rows
            anc = torch.cat([anc, torch.eye(k, dtype=torch.bool, device=dev)], dim=1)  # [k, n_slots + k]
            cache.set_used(committed + n_slots + k)
            mask = torch.cat([torch.ones(k, committed, dtype=torch.bool, device=dev), anc], dim=1)  # [k, used]
            positions = torch.full((1, k), off + committed + depth, device=dev)  # the root sits at `off + committed`
            feats = model(frontier_feat[None], model.d2t[pool.tokens[frontier]][None], positions, mask, cache, slots)[0]
            logp = torch.log_softmax(model.logits(feats).float(), dim=-1)  # [k, V']
            child_p, child_i = logp.topk(k, dim=-1)  # [k, k]
            scores = pool.scores[frontier][:, None] + child_p  # [k, k] cumulative
            first = pool.add(child_i.reshape(-1), scores.reshape(-1), frontier[:, None].expand(k, k).reshape(-1),
                             depth=depth + 1)
            best = scores.reshape(-1).topk(k).indices  # [k] the next frontier, among these k*k
            parent_row = best // k
            frontier = first + best
            frontier_feat = feats[parent_row]
            anc = anc[parent_row]
        cache.set_used(committed)  # drop the scratch rows: the cache holds committed pairs only
        # 3. the best `tree.tokens` candidates; depth breaks score ties so parents rank first
        n_sel = min(tree.tokens, pool.size)
        key = pool.scores[: pool.size] - pool.depths[: pool.size].to(pool.scores.dtype) * 1e-6
        sel = key.topk(n_sel).indices
        packed = torch.stack([sel, model.d2t[pool.tokens[sel]], pool.parents[sel]]).cpu().numpy()  # the only device -> host copy
        sel_score = pool.scores[sel].float().cpu().numpy()
        return self._assemble(int(tokens[-1]), packed, sel_score)

    @staticmethod
    def _assemble(root_token: int, packed: np.ndarray, sel_score: np.ndarray) -> DraftTree:
        """Node 0 = root, selected pool entries below it, parents remapped, best path first."""
        pool_idx, toks, pool_par = packed
        index_of = {int(p): i + 1 for i, p in enumerate(pool_idx)}
        parents = np.array([0 if p < 0 else index_of.get(int(p), -2) for p in pool_par], dtype=np.int64)
        keep = parents != -2  # a parent outside the selection (exact score ties only): drop the child
        if not keep.all():
            return TreeDrafter._assemble(root_token, packed[:, keep], sel_score[keep])
        all_parents = np.concatenate([[-1], parents])
        all_scores = np.concatenate([[0.0], sel_score]).astype(np.float32)
        all_tokens = np.concatenate([[root_token], toks]).astype(np.int32)
        order = order_best_first(all_parents, all_scores)
        new_index = np.empty_like(order)
        new_index[order] = np.arange(order.size)
        ordered_parents = np.where(all_parents[order] < 0, -1, new_index[np.maximum(all_parents[order], 0)])
        return DraftTree(all_tokens[order], ordered_parents.astype(np.int32), all_scores[order])
