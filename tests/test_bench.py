"""`dovetail bench` end to end on the CPU: its JSON is complete and consistent, its plot a PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dovetail_gguf.draft.io import init_draft, save_draft
from dovetail_gguf.gguf_io import read_facts
from dovetail_gguf.models import default_draft_for, default_target_path


def default_draft_path():
    return default_draft_for(read_facts(default_target_path()))


@pytest.mark.slow
def test_bench_json_and_plot(tmp_path, smollm2_path):
    draft = default_draft_path() or save_draft(init_draft(smollm2_path, n_layer=1, draft_vocab=2048), tmp_path / "draft")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = subprocess.run([sys.executable, "-m", "dovetail_gguf", "bench", "--n", "2", "--max-tokens", "16", "--draft", str(draft),
                        "--threads", "2", "--json", str(out), "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "dovetail" in r.stdout and "plain" in r.stdout
    report = json.loads(out.read_text())
    for key in ("cpu", "cores", "threads", "gpu", "llama_cpp_python", "torch"):
        assert key in report["machine"]
    assert report["machine"]["threads"] == 2
    recs = report["records"]
    systems = {"plain", "prompt-lookup", "ngram", "dovetail"}
    assert {r["system"] for r in recs} == systems and len(recs) == 2 * len(systems)
    summary = report["summary"]
    plain = {r["prompt_index"]: r for r in recs if r["system"] == "plain"}
    for system in systems:
        runs = [r for r in recs if r["system"] == system]
        s = summary[system]
        assert s["tokens"] == sum(r["n_tokens"] for r in runs)
        assert s["tokens_per_second"] == pytest.approx(s["tokens"] / sum(r["seconds"] for r in runs))
        ratios = [(r["n_tokens"] / r["seconds"]) / (plain[r["prompt_index"]]["n_tokens"] / plain[r["prompt_index"]]["seconds"]) for r in runs]
        assert s["speedup_median"] == pytest.approx(float(np.median(ratios)))
    dov = [r for r in recs if r["system"] == "dovetail"]
    assert summary["dovetail"]["tau"] == pytest.approx(sum(r["accepted_tokens"] for r in dov) / sum(r["rounds"] for r in dov))
    assert summary["plain"]["tau"] == pytest.approx(1.0)
    assert summary["dovetail"]["identical_to_plain"] is True  # greedy Dovetail is lossless
    assert summary["ngram"]["identical_to_plain"] is True
    assert summary["plain"]["speedup_median"] == pytest.approx(1.0)
    assert "acceptance_by_depth" not in summary["plain"]
    s = summary["dovetail"]  # where the time goes, against what t(k) allows
    assert s["rows_per_round"] == pytest.approx(sum(r["verified_rows"] for r in dov) / sum(r["rounds"] for r in dov))
    # acceptance, roofline and the free-draft figure, recomputed from the records and the measured t(k)
    from dovetail_gguf.bench import RunRecord, acceptance_by_depth, roofline
    from dovetail_gguf.costs import estimate_ms

    assert s["acceptance_by_depth"] == pytest.approx(acceptance_by_depth([RunRecord(**r) for r in dov]))
    verify_ms = {int(k): v for k, v in report["settings"]["verify_ms"].items()}
    assert [s["roofline"], s["roofline_depth"]] == pytest.approx(list(roofline(verify_ms, s["acceptance_by_depth"])))
    assert s["free_draft_speedup"] == pytest.approx(
        s["tau"] * float(estimate_ms(verify_ms, 1)) / float(estimate_ms(verify_ms, s["rows_per_round"])))
    assert "acceptance by depth" in r.stdout and "roofline" in r.stdout
    assert report["peak_rss_bytes"] > 50 * 2**20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_repeats_keep_the_fastest_run_of_each_system(smollm2_path):
    from dovetail_gguf.bench import run_bench
    from dovetail_gguf.errors import InvalidArgumentError

    report = run_bench(["def add(a, b):", "The sky is"], smollm2_path, False, max_tokens=8, threads=2,
                       systems=("plain", "ngram"), progress=False, repeats=3)
    assert report["settings"]["repeats"] == 3
    recs = report["records"]
    assert sorted((r["system"], r["prompt_index"]) for r in recs) == [("ngram", 0), ("ngram", 1), ("plain", 0), ("plain", 1)]
    for r in recs:
        assert len(r["repeat_seconds"]) == 3 and r["seconds"] == min(r["repeat_seconds"])
    assert report["summary"]["ngram"]["identical_to_plain"] is True
    with pytest.raises(InvalidArgumentError, match="repeats"):
        run_bench(["x"], smollm2_path, False, systems=("plain",), repeats=0)


def test_a_fill_in_the_middle_workload(qwen_path, tmp_path):
    """FIM requests from a prompts file: laid out in the model's FIM format, every system on the same
    tokens, the middle's exact-match rate reported; a malformed row is an error naming its line."""
    from dovetail_gguf.bench import file_prompts, run_bench
    from dovetail_gguf.errors import InvalidArgumentError

    rows = [{"prefix": "def double(x):\n", "suffix": "\n\nprint(double(2))\n", "middle": "    return 2 * x\n",
             "extra": [{"filename": "util.py", "text": "def triple(x):\n    return 3 * x\n"}]}]
    path = tmp_path / "fim.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = file_prompts(path)
    assert prompts == rows
    report = run_bench(prompts, qwen_path, False, max_tokens=8, threads=2, n_ctx=512, systems=("plain", "ngram"),
                       progress=False)
    s = report["summary"]
    assert s["ngram"]["identical_to_plain"] is True and 0.0 <= s["plain"]["exact_match"] <= 1.0
    texts = {r["system"]: r["text"] for r in report["records"]}
    assert s["plain"]["middle_first"] == float(texts["plain"].startswith(rows[0]["middle"].rstrip()))
    path.write_text(json.dumps({"prefix": "x", "suffix": 3}) + "\n")
    with pytest.raises(InvalidArgumentError, match=":1: a fill-in-the-middle request"):
        file_prompts(path)
