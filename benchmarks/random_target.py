"""A LLaMA-shaped GGUF with random weights, quantized by llama.cpp: for kernel probes and speed at
shapes no shipped model has (its output is noise).

    python benchmarks/random_target.py OUT.gguf --shape 1.5b --type q4_k_m

The weights are written as random Q8_0 blocks (fast, and small next to F16) and requantized by
llama.cpp's own quantizer, so a Q4_K_M file has the tensor mix a converted model gets: Q4_K for most
matrices, Q6_K for the output and some of attn_v / ffn_down.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("random_target")

# name: (n_embd, n_layer, n_head, n_kv_head, n_ff, n_vocab); every width a multiple of 256 (K-quants)
SHAPES = {
    "tiny": (512, 2, 8, 4, 1536, 4096),
    "1.5b": (1536, 28, 12, 2, 8960, 151936),  # Qwen2.5-1.5B's widths, LLaMA's layout
    "7b": (4096, 32, 32, 32, 11008, 32000),  # LLaMA-2-7B
}
Q8_BLOCK, Q8_BYTES = 32, 34


def _q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q8_0 rows as bytes: a scale of 0.02/127 per block (weights within +-0.02), random quants."""
    blocks = rng.integers(-127, 128, size=(rows * cols // Q8_BLOCK, Q8_BYTES), dtype=np.int16).astype(np.uint8)
    blocks[:, 0:2] = np.array([0.02 / 127], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // Q8_BLOCK * Q8_BYTES)


def write_random_llama(out: Path, shape: tuple[int, ...], seed: int = 0) -> None:
    """A Q8_0 LLaMA GGUF of ``shape`` with random weights and a placeholder vocabulary."""
    import gguf

    n_embd, n_layer, n_head, n_kv, n_ff, n_vocab = shape
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("random-llama")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * n_vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    q8 = gguf.GGMLQuantizationType.Q8_0
    kv_dim = n_embd // n_head * n_kv
    w.add_tensor("token_embd.weight", _q8_0(rng, n_vocab, n_embd), raw_dtype=q8)
    for i in range(n_layer):
        p = f"blk.{i}."
        for name, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", kv_dim, n_embd), ("attn_v", kv_dim, n_embd),
                                 ("attn_output", n_embd, n_embd), ("ffn_gate", n_ff, n_embd),
                                 ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)):
            w.add_tensor(p + name + ".weight", _q8_0(rng, rows, cols), raw_dtype=q8)
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", _q8_0(rng, n_vocab, n_embd), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make(out: Path, shape: str = "tiny", outtype: str = "q4_k_m", seed: int = 0) -> Path:
    """Write ``out``: a random LLaMA of ``shape`` quantized to ``outtype``; nothing is left half-written."""
    from convert.hf import llama_quantize

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage, done = Path(tmp) / "q8_0.gguf", Path(tmp) / out.name
        write_random_llama(stage, SHAPES[shape], seed)
        llama_quantize(stage, done, outtype, allow_requantize=True)
        os.replace(done, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--type", default="q4_k_m", help="llama.cpp quantization: q4_k_m, q4_0, q5_k_m, q6_k")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("writing a random %s LLaMA, %s, to %s", args.shape, args.type, args.out)
    make(args.out, args.shape, args.type, args.seed)


if __name__ == "__main__":
    main()
