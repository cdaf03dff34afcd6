"""Self-distillation data and draft training on the real SmolLM2 target."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dovetail_gguf.engine import TreeConfig
from dovetail_gguf.errors import DovetailError, InvalidArgumentError
from dovetail_gguf.target import Target, TargetConfig
from dovetail_gguf.train import data as data_mod
from dovetail_gguf.train.data import DataConfig, generate_data, load_shards, read_prompts
from dovetail_gguf.train.trainer import TrainConfig, split_heldout, train_draft

PROMPTS = [
    {"prompt": 'def add(a, b):\n    """Return the sum of a and b."""\n'},
    {"conversations": [{"from": "human", "value": "Name three fruits."}]},
    {"prompt": "The capital of France is"},
    {"conversations": [{"role": "user", "content": "Write a haiku about rain."}]},
    {"prompt": 'def is_even(n):\n    """Return True when n is even."""\n'},
    {"prompt": "Water boils at"},
    {"conversations": [{"role": "user", "content": "What is 2 + 2?"}]},
    {"prompt": 'def reverse(s):\n    """Return the string s reversed."""\n'},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CFG = DataConfig(max_new_tokens=32, max_prompt_tokens=64, batch_size=3, prompts_per_shard=3)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("data")
    prompts = write_jsonl(d / "prompts.jsonl", PROMPTS)
    return generate_data(smollm2_path, prompts, d / "shards", CFG, progress=False), prompts


def test_shards_hold_the_targets_hidden_states(small_data, smollm2_path):
    """Equal to a from-scratch evaluation, up to the fp16 the shards store.

    The reference runs in ubatches of 32 rows, the kernel family generation
    used (every packed prefill here is under 64 rows and under 256 KV cells;
    beyond those llama.cpp switches kernels and results drift by ~1%).
    """
    out, _ = small_data
    manifest, seqs = load_shards(out)
    assert manifest["n_prompts"] == len(PROMPTS) and len(seqs) == len(PROMPTS)
    assert [s["prompts"] for s in manifest["shards"]] == [[0, 3], [3, 6], [6, 8]]
    with Target(smollm2_path, TargetConfig(n_ubatch=32)) as t:
        for toks, hid, plen in seqs:
            assert len(toks) > plen  # the target wrote an answer
            t.reset()
            _, ref = t.prefill(toks)
            np.testing.assert_array_equal(hid, ref.astype(np.float16))


def test_resume_after_interruption_gives_the_same_shards(small_data, tmp_path, smollm2_path, monkeypatch):
    full, prompts = small_data
    real = data_mod._generate_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first shard (one batch of 3) is written; die in the third batch
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "_generate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_data(smollm2_path, prompts, tmp_path / "resumed", CFG, progress=False)
    assert len(json.loads((tmp_path / "resumed" / "manifest.json").read_text())["shards"]) == 2
    monkeypatch.setattr(data_mod, "_generate_batch", real)
    generate_data(smollm2_path, prompts, tmp_path / "resumed", CFG, progress=False)
    (_, a), (_, b) = load_shards(full), load_shards(tmp_path / "resumed")
    assert len(a) == len(b)
    for (ta, ha, pa), (tb, hb, pb) in zip(a, b):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ha, hb)
        assert pa == pb


def test_bad_prompt_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(InvalidArgumentError, match=r"bad.jsonl:2: malformed JSON"):
        read_prompts(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InvalidArgumentError, match="no prompts"):
        read_prompts(empty)
    (tmp_path / "odd.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(InvalidArgumentError, match="odd.jsonl:1"):
        read_prompts(tmp_path / "odd.jsonl")


def test_data_of_one_target_is_not_resumed_with_another(small_data, gemma_path):
    out, prompts = small_data
    with pytest.raises(DovetailError, match="cannot resume"):
        generate_data(gemma_path, prompts, out, CFG, progress=False)


@pytest.mark.slow
def test_training_lowers_heldout_loss_and_beats_an_untrained_draft(small_data, tmp_path, smollm2_path):
    out, _ = small_data
    cfg = TrainConfig(n_layer=1, draft_vocab=2048, steps=300, batch_size=4, seq_len=96, lr=1e-3, warmup=20, unroll=2,
                      heldout_fraction=0.25, eval_every=150, checkpoint_every=100, tau_prompts=2, tau_max_tokens=24)
    untrained = train_draft(smollm2_path, out, tmp_path / "d0", TrainConfig(**{**cfg.__dict__, "steps": 1, "eval_every": 1, "tau_prompts": 0}), progress=False)
    report = train_draft(smollm2_path, out, tmp_path / "d1", cfg, progress=False)
    first = untrained["history"][-1]["heldout"]
    last = report["history"][-1]["heldout"]
    assert last["loss"] < first["loss"]
    assert last["acc"] > first["acc"]
    assert last["acc@1"] > first["acc@1"]  # the pass on its own predictions learns too
    assert (tmp_path / "d1" / "model.safetensors").is_file() and not (tmp_path / "d1.checkpoint").exists()
    # τ through the real engine on the two held-out prompts, saved with the report
    tau = json.loads((tmp_path / "d1" / "training_report.json").read_text())["heldout_tau"]
    assert tau["n_prompts"] == 2 and tau["rounds"] > 0
    assert tau["tau"] == pytest.approx(tau["accepted_tokens"] / tau["rounds"])
    assert 1.0 <= tau["tau"] <= TreeConfig().depth + 1
    assert tau["accepted_tokens"] >= tau["rounds"]


def test_heldout_split_follows_the_prompts_not_their_order():
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, 1000, size=20).astype(np.int32), None, 8) for _ in range(200)]
    cfg = TrainConfig(heldout_fraction=0.1)
    held, train = split_heldout(seqs, cfg)
    assert len(held) == 20 and len(train) == 180
    ids = lambda part: sorted(s[0][:8].tobytes() for s in part)  # noqa: E731
    shuffled = [seqs[i] for i in rng.permutation(len(seqs))]
    assert ids(split_heldout(shuffled, cfg)[0]) == ids(held)
    assert ids(split_heldout(seqs, TrainConfig(heldout_fraction=0.1, seed=1))[0]) != ids(held)
    # only the prompt decides: a different answer to the same prompt stays on the same side
    answered = [(np.concatenate([t[:8], rng.integers(0, 1000, size=5).astype(np.int32)]), None, 8) for t, _h, _p in seqs]
    assert ids(split_heldout(answered, cfg)[0]) == ids(held)


def test_training_reads_several_data_folders(small_data, tmp_path, smollm2_path):
    out, _ = small_data
    cfg = TrainConfig(n_layer=1, draft_vocab=256, steps=1, batch_size=2, seq_len=32, warmup=1, eval_every=1,
                      heldout_fraction=0.25, tau_prompts=0)
    report = train_draft(smollm2_path, [out, out], tmp_path / "d", cfg, progress=False)
    assert report["n_sequences"] == 2 * len(PROMPTS)
    assert report["data"] == [str(out), str(out)]
    with pytest.raises(InvalidArgumentError, match="no data folder"):
        train_draft(smollm2_path, [], tmp_path / "e", cfg, progress=False)


@pytest.mark.parametrize("lr, error", [(1e10, "diverged"), (float("inf"), "refused")])
def test_diverging_training_stops_with_an_error_and_saves_nothing(small_data, tmp_path, smollm2_path, lr, error):
    from dovetail_gguf.train.trainer import TrainingDivergedError

    out, _ = small_data
    cfg = TrainConfig(n_layer=1, draft_vocab=256, steps=4, batch_size=2, seq_len=32, lr=lr, warmup=1,
                      eval_every=10, heldout_fraction=0.25, tau_prompts=0)
    expected = (TrainingDivergedError, "non-finite|became") if error == "diverged" else (InvalidArgumentError, "learning rate")
    with pytest.raises(expected[0], match=expected[1]):
        train_draft(smollm2_path, out, tmp_path / "d", cfg, progress=False)
    assert not (tmp_path / "d").exists()


def test_short_windows_train_instead_of_crashing_at_the_end(small_data, tmp_path, smollm2_path):
    """--seq-len 16 leaves windows and held-out batches without answer tokens: they are skipped."""
    out, _ = small_data
    cfg = TrainConfig(n_layer=1, draft_vocab=256, steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=3,
                      heldout_fraction=0.25, tau_prompts=0)
    report = train_draft(smollm2_path, out, tmp_path / "d", cfg, progress=False)
    assert (tmp_path / "d" / "model.safetensors").is_file()
    assert report["history"][-1]["step"] == 3


def test_a_chat_flag_renders_the_prompt_as_a_user_message(tmp_path, smollm2_path):
    rows = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Name a fruit.", "chat": True}, {"prompt": "Name a fruit."}])
    (chat, chat_msgs), (raw, raw_msgs) = read_prompts(rows)
    assert chat.chat and chat_msgs == [{"role": "user", "content": "Name a fruit."}]
    assert not raw.chat and raw_msgs is None
    with Target(smollm2_path, TargetConfig(n_ctx=256)) as t:
        from dovetail_gguf.chat import chat_tokens

        assert data_mod._encode(t, chat, chat_msgs, 512).tolist() == chat_tokens(t, chat_msgs).tolist()
        assert data_mod._encode(t, raw, raw_msgs, 512).tolist() == t.tokenize("Name a fruit.").tolist()


def test_init_refuses_another_shape_and_resume_refuses_other_data(small_data, tmp_path, smollm2_path):
    out, _ = small_data
    cfg = TrainConfig(n_layer=1, draft_vocab=256, steps=2, batch_size=2, seq_len=32, warmup=1, eval_every=2,
                      checkpoint_every=1, heldout_fraction=0.25, tau_prompts=0)
    first = tmp_path / "first"
    train_draft(smollm2_path, out, first, cfg, progress=False)
    with pytest.raises(InvalidArgumentError, match="layers 2 \\(it has 1\\)"):
        train_draft(smollm2_path, out, tmp_path / "x", TrainConfig(**{**cfg.__dict__, "n_layer": 2}), init_from=first,
                    progress=False)
    # a checkpoint left by a run on other data is not resumed with a mismatched d2t
    interrupted = tmp_path / "second"
    cfg4 = TrainConfig(**{**cfg.__dict__, "steps": 4})
    ckpt = interrupted.with_name("second.checkpoint")
    ckpt.mkdir()
    import torch

    torch.save({"config": cfg4.__dict__ | {}, "source": "another", "step": 1, "history": []}, ckpt / "state.pt")
    with pytest.raises(InvalidArgumentError, match="other data folders"):
        train_draft(smollm2_path, out, interrupted, cfg4, progress=False)


@pytest.mark.slow
def test_two_process_training_draws_different_batches_and_ends_with_the_same_weights(small_data, tmp_path):
    """Two CPU processes (torchrun + accelerate's MULTI_CPU, gloo; `accelerate launch --cpu` runs one process
    only): DDP averages the gradients, so both ranks hold the same weights at the end, although each drew
    its own batches."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    out, _ = small_data
    import os

    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "dovetail_gguf", "-v",
                        "train-draft", str(out), "-o", str(tmp_path / "ddp"), "--layers", "1", "--draft-vocab", "256",
                        "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--tau-prompts", "0"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    batches = re.findall(r"rank (\d): first batch (\[.*?\])", r.stderr)
    digests = dict(re.findall(r"rank (\d): weights digest (\w+)", r.stderr))
    assert sorted(rank for rank, _ in batches) == ["0", "1"] and batches[0][1] != batches[1][1]
    assert len(digests) == 2 and digests["0"] == digests["1"]
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
