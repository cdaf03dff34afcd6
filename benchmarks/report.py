#!/usr/bin/env python3
"""docs/performance.md, its plots and README.md's performance table, from the bench reports in
benchmarks/results/.

usage: python benchmarks/report.py            write docs/performance.md, docs/img/*.png, README's table
       python benchmarks/report.py --check    exit 1 if the committed pages differ from what it writes

A bench report is a ``dovetail bench --json`` file named ``DATE_MACHINE_TARGET_WORKLOAD.json``
(``2026-12-07_epyc-avx2_qwen-coder-0.5b_edit-chat.json``); the newest one per machine, target and
workload is the current figure. Only reports of the default (invariant) kernels count.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "performance.md"
IMAGES = ROOT / "docs" / "img"
README = ROOT / "README.md"
BEGIN, END = "<!-- performance table: benchmarks/report.py -->", "<!-- end of performance table -->"

MACHINES = {"epyc-avx2": "AMD EPYC, AVX2", "epyc-avx512": "AMD EPYC, AVX-512", "xeon-amx": "Intel Xeon, AMX"}
TARGETS = {"qwen-coder-0.5b": "Qwen2.5-Coder-0.5B Q4_K_M", "smollm2-135m": "SmolLM2-135M Q4_1"}
TARGET_NAMES = {"qwen-coder-0.5b": "qwen2.5-coder-0.5b", "smollm2-135m": "smollm2-135m"}  # as --target takes them
WORKLOADS = {  # name: (what it is, the prompts and flags behind it)
    "edit-chat": ("code edit requests", "--prompts benchmarks/prompts/edit.jsonl --chat"),
    "humaneval-chat": ("HumanEval problems as chat requests", "--chat (HumanEval 0-19)"),
    "humaneval": ("HumanEval completions", "(HumanEval 0-19, raw prompts)"),
    "prose-chat": ("prose requests", "--prompts benchmarks/prompts_general.jsonl --chat"),
    "fim": ("fill-in-the-middle requests", "--prompts benchmarks/prompts/fim.jsonl"),
    "fim-repeat": ("fill-in-the-middle, the middle elsewhere in the context", "--prompts benchmarks/prompts/fim_repeat.jsonl"),
}
NAME = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})_(?P<machine>[a-z0-9-]+?)_(?P<target>" +
                  "|".join(map(re.escape, TARGETS)) + r")_(?P<workload>" + "|".join(map(re.escape, WORKLOADS)) + r")\.json$")
SYSTEM_ORDER = ("plain", "plain-fast", "llama-cpp-python", "prompt-lookup", "llama-server:ngram-mod",
                "llama-server:ngram-map-k4v", "llama-server:ngram-simple", "ngram", "dovetail", "dovetail-predicted")
SPECULATIVE_MAIN = "dovetail"


@dataclass
class Report:
    path: Path
    date: str
    machine: str
    target: str
    workload: str
    doc: dict

    @property
    def summary(self) -> dict:
        return self.doc["summary"]

    @property
    def settings(self) -> dict:
        return self.doc["settings"]

    @property
    def command(self) -> str:
        s = self.settings
        systems = ",".join(x for x in SYSTEM_ORDER if x in self.summary)
        target = "" if self.target == "smollm2-135m" else f" --target {TARGET_NAMES[self.target]}"
        flags = WORKLOADS[self.workload][1]
        prompts = flags.split(" (")[0] if flags.startswith("--") else ("--chat" if "chat" in self.workload else "")
        repeats = f" --repeats {s['repeats']}" if s.get("repeats", 1) > 1 else ""
        return (f"dovetail bench{target} {prompts} --n {s['n_prompts']} --max-tokens {s['max_tokens']}{repeats} "
                f"--threads {self.doc['machine']['threads']} --systems {systems} --json {self.path.name}").replace("  ", " ")


def load_reports(results: Path = RESULTS) -> list[Report]:
    """The current report per (machine, target, workload): the newest of the default kernels."""
    newest: dict[tuple[str, str, str], Report] = {}
    for path in sorted(results.glob("*.json")):
        m = NAME.match(path.name)
        if not m:
            continue
        doc = json.loads(path.read_text())
        if "summary" not in doc or doc.get("settings", {}).get("kernels", "invariant") != "invariant" \
                or "kernels" not in doc.get("settings", {}):
            continue
        r = Report(path, m["date"], m["machine"], m["target"], m["workload"], doc)
        key = (r.machine, r.target, r.workload)
        if key not in newest or newest[key].date <= r.date:
            newest[key] = r
    return sorted(newest.values(), key=lambda r: (r.machine, r.target, list(WORKLOADS).index(r.workload)))


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _identical(s: dict, n: int) -> str:
    return f"{s['n_identical']}/{n}"


def readme_table(reports: list[Report]) -> str:
    """One row per current report: the workload, Dovetail's median speedup, llama.cpp's best
    self-speculation in the same run, identity with plain decoding."""
    lines = [BEGIN, "",
             "| machine | target | workload | dovetail | best llama.cpp n-gram mode | prompt lookup | identical to `--no-draft` | report |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        s, n = r.summary, r.settings["n_prompts"]
        main = s.get(SPECULATIVE_MAIN) or s.get("ngram") or {}
        peers = {k: v for k, v in s.items() if k.startswith("llama-server:")}
        best = max(peers.items(), key=lambda kv: kv[1]["speedup_median"] or 0.0) if peers else None
        peer = f"{_x(best[1]['speedup_median'])} ({best[0].split(':')[1]})" if best else "-"
        lookup = _x(s["prompt-lookup"]["speedup_median"]) if "prompt-lookup" in s else "-"
        same = _identical(main, n) if main else "-"
        link = f"[{r.path.name}](benchmarks/results/{r.path.name})"
        lines.append(f"| {MACHINES.get(r.machine, r.machine)} | {TARGETS[r.target]} | {WORKLOADS[r.workload][0]} | "
                     f"**{_x(main.get('speedup_median'))}** | {peer} | {lookup} | {same} | {link} |")
    lines += ["", END]
    return "\n".join(lines)


def page(reports: list[Report]) -> str:
    out = ["# Performance", "",
           "Written by `python benchmarks/report.py` from the bench reports in `benchmarks/results/`; do not edit.",
           "Every figure is a median over prompts of a system's tokens/s divided by plain decoding's on the",
           "same prompt in the same run (prefill excluded for every system), greedy, 2 threads. *Identical*",
           "counts the prompts whose output is token for token plain decoding's (by text for the systems",
           "outside this engine). The *replay bound* is what a planner that knew each round's accepted length",
           "would get from the suffix index alone, with the measured t(k).", ""]
    for machine in dict.fromkeys(r.machine for r in reports):
        mine = [r for r in reports if r.machine == machine]
        out += [f"## {MACHINES.get(machine, machine)}", "",
                f"CPU: {mine[0].doc['machine']['cpu']}, llama-cpp-python {mine[0].doc['machine']['llama_cpp_python']}.", "",
                f"![speedup per workload](img/speedup_{machine}.png)", ""]
        for r in mine:
            s, n = r.summary, r.settings["n_prompts"]
            out += [f"### {TARGETS[r.target]}: {WORKLOADS[r.workload][0]}", "",
                    f"{n} prompts, {r.settings['max_tokens']} tokens, {r.date}: "
                    f"[{r.path.name}](../benchmarks/results/{r.path.name})", "",
                    f"    {r.command}", "",
                    "| system | tok/s | speedup | identical | τ | replay bound |", "|---|---|---|---|---|---|"]
            for system in [x for x in SYSTEM_ORDER if x in s]:
                v = s[system]
                tau = "-" if v.get("tau") is None else f"{v['tau']:.2f}"
                out.append(f"| {system} | {v['tokens_per_second']:.1f} | {_x(v['speedup_median'])} | "
                           f"{_identical(v, n)} | {tau} | {_x(v.get('replay_bound_median'))} |")
            acc = (s.get(SPECULATIVE_MAIN) or {}).get("acceptance_by_depth")
            if acc and max(acc) > 0:
                out += ["", "Dovetail's acceptance by depth: " + ", ".join(f"{a:.2f}" for a in acc[:6]) + "."]
            gap = (s.get(SPECULATIVE_MAIN) or {}).get("cost_model")
            if gap and gap["all"]["rounds"]:
                kinds = ", ".join(f"{k} {gap[k]['measured_over_predicted_median']:.2f} ({gap[k]['rounds']} rounds)"
                                  for k in ("plain", "free", "drafted") if gap[k]["rounds"])
                out += ["", f"The planner's round time, measured over predicted (median): "
                            f"{gap['all']['measured_over_predicted_median']:.2f}; by kind: {kinds}."]
            out.append("")
        tk = _verify_curve(mine)
        if tk:
            out += ["### Verification cost t(k)/t(1)", "",
                    f"![t(k)/t(1)](img/tk_{machine}.png)", "",
                    "| target | " + " | ".join(f"k={k}" for k in tk[0][1]) + " |",
                    "|---|" + "---|" * len(tk[0][1])]
            for name, curve in tk:
                out.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in curve.values()) + " |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _verify_curve(reports: list[Report]) -> list[tuple[str, dict[int, float]]]:
    """t(k)/t(1) per target at the row counts every report measured."""
    curves = {}
    for r in reports:
        ms = r.settings.get("verify_ms")
        if ms and r.target not in curves:
            ms = {int(k): float(v) for k, v in ms.items()}
            ks = [k for k in (1, 2, 4, 8, 16, 32, 48, 63, 64) if k in ms]
            curves[r.target] = {k: ms[k] / ms[1] for k in ks}
    if not curves:
        return []
    common = set.intersection(*(set(c) for c in curves.values()))
    return [(TARGETS[t], {k: v for k, v in c.items() if k in common}) for t, c in curves.items()]


def plots(reports: list[Report]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMAGES.mkdir(parents=True, exist_ok=True)
    written = []
    for machine in dict.fromkeys(r.machine for r in reports):
        mine = [r for r in reports if r.machine == machine]
        systems = [x for x in SYSTEM_ORDER if x != "plain" and any(x in r.summary for r in mine)]
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / max(1, len(systems))
        for j, system in enumerate(systems):
            xs = [i + j * width for i, r in enumerate(mine) if system in r.summary]
            ys = [r.summary[system]["speedup_median"] or 0.0 for r in mine if system in r.summary]
            ax.bar(xs, ys, width, label=system)
        ax.axhline(1.0, color="#444", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mine))],
                      [f"{r.target}\n{r.workload}" for r in mine], fontsize=8)
        ax.set_ylabel("speedup over plain (median)")
        ax.set_title(MACHINES.get(machine, machine))
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = IMAGES / f"speedup_{machine}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
        tk = _verify_curve(mine)
        if tk:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for name, curve in tk:
                ax.plot(list(curve), list(curve.values()), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rows k")
            ax.set_ylabel("t(k) / t(1)")
            ax.set_title(MACHINES.get(machine, machine))
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = IMAGES / f"tk_{machine}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def readme_with_table(readme: str, table: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = readme.split(BEGIN, 1)
    return head + table + rest.split(END, 1)[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed pages instead of writing them")
    args = ap.parse_args()
    reports = load_reports()
    if not reports:
        print("no bench reports in benchmarks/results/", file=sys.stderr)
        return 1
    want_page = page(reports)
    want_readme = readme_with_table(README.read_text(), readme_table(reports))
    if args.check:
        stale = [p.relative_to(ROOT) for p, want in ((PAGE, want_page), (README, want_readme))
                 if not p.is_file() or p.read_text() != want]
        stale += [p.relative_to(ROOT) for p in _image_paths(reports) if not p.is_file()]
        if stale:
            print(f"out of date: {', '.join(map(str, stale))}; run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(want_page)
    README.write_text(want_readme)
    for p in plots(reports):
        print(f"wrote {p.relative_to(ROOT)}")
    print(f"wrote {PAGE.relative_to(ROOT)} and README.md's table ({len(reports)} reports)")
    return 0


def _image_paths(reports: list[Report]) -> list[Path]:
    machines = dict.fromkeys(r.machine for r in reports)
    return [IMAGES / f"speedup_{m}.png" for m in machines] + \
        [IMAGES / f"tk_{m}.png" for m in machines if _verify_curve([r for r in reports if r.machine == m])]


if __name__ == "__main__":
    sys.exit(main())
