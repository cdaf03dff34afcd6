"""The user-facing pages: generated figures match the committed reports, links resolve, and the
README's quick start is the one CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "models").glob("*/README.md"))]


def test_performance_page_and_readme_table_match_the_committed_reports():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_no_development_history_in_user_pages_or_result_names():
    words = re.compile(r"\bsessions?\b|\bsession-\d", re.IGNORECASE)
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in PAGES for m in words.finditer(p.read_text())]
    found += [p.name for p in (ROOT / "benchmarks" / "results").iterdir() if re.search(r"_s\d+[_.]|session", p.name)]
    assert not found, found


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and block[0].startswith("./setup.sh && ") and block[1] == ".venv/bin/python -m pytest -q"
