"""Settings of a draft training run (no heavy imports: the CLI reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError


@dataclass
class TrainConfig:
    n_layer: int = 2  # the shipped drafts' depth; every entry point defaults to it
    fusion: str = "dgf"
    draft_vocab: int | None = 8192  # None: the full target vocabulary
    intermediate_size: int | None = None  # the draft's MLP width (None: the target's)
    steps: int = 2000
    batch_size: int = 8  # sequences per step
    seq_len: int = 256  # tokens per training window
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    ce_weight: float = 0.1
    noise: float = 0.2  # uniform feature noise in [-noise/2, noise/2]
    unroll: int = 2  # passes on the draft's own predictions (1: teacher forcing only)
    heldout_fraction: float = 0.05
    eval_every: int = 250
    tau_prompts: int = 20  # held-out prompts for τ through the engine at the end (0: skip)
    tau_max_tokens: int = 128
    checkpoint_every: int = 250
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 4:
            raise InvalidArgumentError("steps, batch_size >= 1 and seq_len >= 4 are needed")
        if not 1 <= self.unroll <= 8:
            raise InvalidArgumentError("unroll must be in 1..8")
        if not 0 < self.heldout_fraction < 0.5:
            raise InvalidArgumentError("heldout_fraction must be in (0, 0.5)")
        if not (0 < self.lr < float("inf")):
            raise InvalidArgumentError(f"the learning rate must be a positive number, got {self.lr}")
        if not (0 <= self.weight_decay < float("inf")):
            raise InvalidArgumentError(f"the weight decay must be a number >= 0, got {self.weight_decay}")
        if not -(2**63) <= self.seed < 2**63:
            raise InvalidArgumentError(f"the seed must fit in 64 bits, got {self.seed}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise InvalidArgumentError("the MLP width must be positive")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise InvalidArgumentError("the draft vocabulary must be positive")
