"""The Dovetail draft model in one file: DGF fusion, LLaMA decoder layers, a KV cache.

Input at position t is the pair (f_{t-1}, x_t): the target's post-norm hidden
state that predicted token x_t, and x_t itself. DGF fuses the two:

    h1 = f W1
    h2 = SiLU(RMSNorm(e) W2)          e = embedding of x_t (the target's, frozen)
    z  = sigmoid([h1; h2] Wz)
    x  = z * h1 + (1 - z) * h2

then ``n_layer`` LLaMA decoder layers (the first without input norm, as in
EAGLE) predict f_t, and the target's frozen LM head turns f_t into logits for
x_{t+1}. With a reduced draft vocabulary the head keeps only the rows of the
``draft_vocab`` most frequent target tokens and ``d2t`` maps back to target ids.

The embedding table and the LM head belong to the target: they are passed in,
shared, and never written to a draft checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidArgumentError


@dataclass
class DraftConfig:
    """Shape of a draft and the target it belongs to."""

    n_embd: int
    n_vocab: int  # the target's vocabulary
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 8
    head_dim: int | None = None  # default n_embd // n_head
    intermediate_size: int | None = None  # default the LLaMA rule, about 8/3 n_embd
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    fusion: str = "dgf"  # "dgf" (Dovetail) or "fc" (EAGLE's fc(cat(emb, feature)))
    draft_vocab: int | None = None  # None: the full target vocabulary
    max_positions: int = 8192
    target: dict = field(default_factory=dict)  # architecture, n_embd, n_vocab, tokenizer_fingerprint, name

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 256 * math.ceil(int(8 * self.n_embd / 3) / 256)
        if self.fusion not in ("dgf", "fc"):
            raise InvalidArgumentError(f"fusion must be 'dgf' or 'fc', got {self.fusion!r}")
        if self.n_head % self.n_kv_head:
            raise InvalidArgumentError("n_head must be a multiple of n_kv_head")
        if self.draft_vocab is not None and not 0 < self.draft_vocab <= self.n_vocab:
            raise InvalidArgumentError(f"the draft vocabulary must be in 1..{self.n_vocab} (the target's), got {self.draft_vocab}")

    @property
    def head_vocab(self) -> int:
        return self.draft_vocab or self.n_vocab

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class DynamicGatingFusion(nn.Module):
    """DGF: a learned per-channel gate between the target feature and the token embedding."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, dim, bias=False)
        self.wz = nn.Linear(2 * dim, dim, bias=False)
        self.emb_norm = RMSNorm(dim, eps)
        for lin in (self.w1, self.w2, self.wz):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, feature: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h1 = self.w1(feature)
        h2 = F.silu(self.w2(self.emb_norm(emb)))
        z = torch.sigmoid(self.wz(torch.cat([h1, h2], dim=-1)))
        return z * h1 + (1 - z) * h2


class FcFusion(nn.Module):
    """EAGLE's fusion, for the ablation: fc(cat(embedding, feature))."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(2 * dim, dim, bias=True)

    def forward(self, feature: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([emb, feature], dim=-1))


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D]; cos/sin [..., T, D] (rotate-half convention, as HF LLaMA)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache: "LayerCache | None", slots: torch.Tensor | None):
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv_head, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv_head, self.head_dim)
        if cache is not None:  # write the new rows into their slots, attend over the used slots
            k, v = cache.write(slots, k, v)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [b, heads, t, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_head != self.n_kv_head
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DraftConfig, first: bool):
        super().__init__()
        self.input_norm = nn.Identity() if first else RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.gate = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache, slots):
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache, slots)
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LayerCache:
    """Keys and values of one layer for a single sequence, in preallocated slots."""

    def __init__(self, capacity: int, n_kv_head: int, head_dim: int, device, dtype):
        self.k = torch.zeros(1, capacity, n_kv_head, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.used = 0  # slots [0, used) are visible to attention

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[:, slots] = k
        self.v[:, slots] = v
        return self.k[:, : self.used], self.v[:, : self.used]


class DraftKVCache:
    """The draft's KV cache: committed rows first, then scratch rows for the tree being drafted."""

    def __init__(self, cfg: DraftConfig, capacity: int, device, dtype):
        self.capacity = capacity
        self.layers = [LayerCache(capacity, cfg.n_kv_head, cfg.head_dim, device, dtype) for _ in range(cfg.n_layer)]
        self.length = 0  # committed rows

    def set_used(self, n: int) -> None:
        for layer in self.layers:
            layer.used = n

    def trim(self, n: int) -> None:
        """Keep the first ``n`` committed rows; everything after them becomes scratch."""
        self.length = n
        self.set_used(n)


class UnrollCache:
    """Keys and values of every unrolled step so far, for training (gradients flow through them)."""

    class Layer:
        def __init__(self):
            self.k: list[torch.Tensor] = []
            self.v: list[torch.Tensor] = []

        def write(self, slots, k: torch.Tensor, v: torch.Tensor):
            self.k.append(k)
            self.v.append(v)
            return torch.cat(self.k, dim=1), torch.cat(self.v, dim=1)

    def __init__(self, n_layer: int):
        self.layers = [UnrollCache.Layer() for _ in range(n_layer)]


def unroll_mask(t: int, step: int, device=None) -> torch.Tensor:
    """Attention of unrolled step ``step`` over the keys of steps 0..step, [t, (step + 1) * t].

    Row i of step j stands for a tree node at depth j + 1 below the pair at
    i - j: it sees the teacher-forced rows (step 0) up to i - j, then one row
    per step along its own ancestry (step s at i - j + s), itself last.
    """
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    blocks = [k <= q - step] + [k == q - step + s for s in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


class DraftModel(nn.Module):
    """DGF (or fc) fusion + LLaMA decoder layers, reading the target's frozen embedding and head."""

    def __init__(self, cfg: DraftConfig, embedding: torch.Tensor, head: torch.Tensor, d2t: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        if tuple(embedding.shape) != (cfg.n_vocab, cfg.n_embd) or tuple(head.shape) != (cfg.n_vocab, cfg.n_embd):
            raise ValueError(
                f"embedding {tuple(embedding.shape)} / head {tuple(head.shape)} do not match "
                f"the draft's ({cfg.n_vocab}, {cfg.n_embd})"
            )
        self.fusion = DynamicGatingFusion(cfg.n_embd, cfg.rms_norm_eps) if cfg.fusion == "dgf" else FcFusion(cfg.n_embd, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i == 0) for i in range(cfg.n_layer))
        # frozen target tensors: buffers that are neither trained nor saved
        self.register_buffer("embedding", embedding, persistent=False)
        if d2t is None:
            if cfg.draft_vocab not in (None, cfg.n_vocab):
                raise ValueError("a reduced draft vocabulary needs its d2t map")
            d2t = torch.arange(cfg.n_vocab)
            draft_head = head
        else:
            d2t = d2t.to(torch.long)
            if d2t.shape != (cfg.head_vocab,):
                raise ValueError(f"d2t has shape {tuple(d2t.shape)}, expected ({cfg.head_vocab},)")
            draft_head = head.index_select(0, d2t)
        self.register_buffer("head", draft_head, persistent=False)
        self.register_buffer("d2t", d2t, persistent=True)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_positions, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def to_inference(self, device: torch.device, dtype: torch.dtype) -> "DraftModel":
        """Move to ``device`` in ``dtype``, keeping the RoPE tables in fp32 (bf16 angles are too coarse).

        The embedding table is only ever gathered a few rows at a time (and cast to the compute
        dtype), so in fp32 it is kept in fp16: half the memory (545 MB -> 272 MB for Qwen2.5's
        151,936 x 896), unless it is also the LM head (a full-vocabulary draft of a tied model)."""
        cos, sin = self.rope_cos.float(), self.rope_sin.float()
        shared = self.embedding.data_ptr() == self.head.data_ptr()
        self.to(device=device, dtype=dtype)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        if dtype == torch.float32 and not shared:
            self.embedding = self.embedding.to(torch.float16)
        return self.eval()

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: "DraftKVCache | UnrollCache | None" = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted features [b, t, d] for input pairs (features [b, t, d], tokens [b, t]).

        Without a cache the attention is causal over the t rows (training).
        With a cache, ``slots`` [t] are the cache rows the new keys go to, the
        cache's ``used`` rows are attended, and ``mask`` [t, used] (bool, True
        = may attend) says which.
        """
        emb = self.embedding[tokens].to(features.dtype)
        x = self.fusion(features, emb)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        attn_mask = None if mask is None else mask.view(1, 1, *mask.shape)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, None if cache is None else cache.layers[i], slots)
        return x

    def unroll(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test: ``steps`` passes, each fed the previous pass's predictions.

        Pass 0 is the teacher-forced forward. Pass j feeds the features pass
        j - 1 predicted (shifted one position) and attends the way a depth
        j + 1 tree node does at inference (see :func:`unroll_mask`), so the
        draft learns from its own errors. Row i of pass j is meaningful for
        i >= j only. Returns one [b, t, d] prediction per pass.
        """
        t = tokens.shape[1]
        cache = UnrollCache(self.cfg.n_layer)
        outs = []
        feats = features
        for j in range(steps):
            outs.append(self.forward(feats, tokens, positions, unroll_mask(t, j, tokens.device), cache))
            feats = torch.cat([features[:, :1], outs[-1][:, :-1]], dim=1)
        return outs

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of predicted features."""
        return features @ self.head.to(features.dtype).T
