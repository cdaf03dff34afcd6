"""Predicted Outputs: a prediction never changes the output, a right one is accepted in long chains,
and the usage counts mean what OpenAI's do. Real SmolLM2 target, greedy."""

from __future__ import annotations

import pytest

from dovetail_gguf import Dovetail
from dovetail_gguf.errors import InvalidArgumentError
from dovetail_gguf.target import TargetConfig

# the default (invariant) kernels: tree rows computed as one-token decodes, so outputs compare bit for bit
TCFG = TargetConfig(n_ctx=1024, n_threads=2)
SOURCE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = sum(values[:window])
    out.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out
'''
N = 80  # the prompt (~150 tokens) and the answer stay within 256 cells
MESSAGES = [{"role": "user", "content": "Rename `values` to `data` in this function and return the whole "
                                        f"function:\n\n```python\n{SOURCE}```"}]


@pytest.fixture(scope="module")
def plain():
    with Dovetail(draft=False, target_config=TCFG) as dt:
        yield dt


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The default pair, as users run it (adaptive, shipped draft, suffix index)."""
    with Dovetail(target_config=TCFG) as dt:
        yield dt


@pytest.fixture(scope="module")
def reference(plain):
    tokens = plain.chat_prompt_tokens(MESSAGES)
    return tokens, plain.generate_tokens(tokens, max_tokens=N)


def test_a_right_prediction_is_accepted_and_changes_nothing(spec, reference):
    tokens, ref = reference
    without = spec.generate_tokens(tokens, max_tokens=N)
    got = spec.generate_tokens(tokens, max_tokens=N, prediction=ref.text)
    assert got.tokens == ref.tokens == without.tokens
    s = got.stats
    assert s.accepted_prediction_tokens >= 0.8 * len(ref.tokens), s
    assert s.accepted_prediction_tokens <= len(ref.tokens)
    assert s.rounds < 0.5 * without.stats.rounds, (s.rounds, without.stats.rounds)  # long verified chains
    assert without.stats.accepted_prediction_tokens == without.stats.rejected_prediction_tokens == 0


def test_a_wrong_prediction_changes_nothing_and_is_refused(spec, reference):
    tokens, ref = reference
    wrong = "The quick brown fox jumps over the lazy dog. " * 20
    got = spec.generate_tokens(tokens, max_tokens=N, prediction=wrong)
    assert got.tokens == ref.tokens
    assert got.stats.accepted_prediction_tokens <= 3, got.stats  # a word or two may coincide


def test_an_empty_prediction_is_no_prediction(spec, reference):
    tokens, ref = reference
    for empty in ("", []):
        got = spec.generate_tokens(tokens, max_tokens=N, prediction=empty)
        assert got.tokens == ref.tokens
        assert got.stats.accepted_prediction_tokens == got.stats.rejected_prediction_tokens == 0


def test_a_prediction_longer_than_max_tokens(spec, reference):
    tokens, ref = reference
    got = spec.generate_tokens(tokens, max_tokens=30, prediction=ref.text + ref.text)
    assert got.tokens == ref.tokens[:30] and got.finish_reason == "length"
    assert 20 <= got.stats.accepted_prediction_tokens <= 30, got.stats


def test_plain_decoding_uses_a_prediction_too(plain, reference):
    """No draft model and no suffix index: the prediction alone is still a source."""
    tokens, ref = reference
    got = plain.generate_tokens(tokens, max_tokens=N, prediction=ref.tokens)  # token ids work as well
    assert got.tokens == ref.tokens
    assert got.stats.accepted_prediction_tokens >= 0.8 * len(ref.tokens)


def test_bad_predictions_are_refused(spec, reference):
    tokens, _ = reference
    with pytest.raises(InvalidArgumentError, match="prediction"):
        spec.generate_tokens(tokens, max_tokens=4, prediction=[-1, 5])
    with pytest.raises(InvalidArgumentError, match="prediction"):
        spec.generate_tokens(tokens, max_tokens=4, prediction={"type": "content"})
