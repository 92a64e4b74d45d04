"""The documentation: a short README, reference pages generated from the code (every exported
name documented, every command's help), plots regenerated from the stored JSON, and the site
built with `mkdocs build --strict` where mkdocs is installed (CI builds it too)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import caproj

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    assert [ln.split("#")[0].strip() for ln in block] == [
        'pip install -e ".[dev]" && caproj demo', "bash .ci/run"]


def test_readme_and_docs_links_point_at_files_that_exist():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
                 ROOT / "benchmarks" / "RESULTS.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_exported_name_has_a_docstring_in_the_api_reference():
    griffe = pytest.importorskip("griffe")
    from docs_hooks import api_reference

    page = api_reference()
    pkg = griffe.load("caproj", search_paths=[str(ROOT / "src")])
    missing = []
    for name in caproj.__all__:
        assert f"::: caproj.{name}\n" in page + "\n", name
        obj = pkg[name]
        doc = obj.target.docstring if obj.is_alias else obj.docstring
        if doc is None or not doc.value.strip():
            missing.append(name)
    assert not missing, f"exported without a docstring: {missing}"


def test_cli_reference_is_every_commands_own_help():
    from docs_hooks import cli_reference

    from caproj.cli import COMMANDS, build_parser

    page = cli_reference()
    for name in COMMANDS:
        assert f"## caproj {name}\n" in page
    ap = build_parser()
    for flag in ("--target-macs", "--factored", "--factored-ramp", "--preset"):
        assert flag in ap.commands["compress"].format_help() and flag in page


def test_plots_are_regenerated_from_the_stored_json(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("needs matplotlib (the dev extra)")
    if not (ROOT / "benchmarks" / "out" / "deep" / "r56-0.25-lr0.02").is_dir():
        pytest.skip("the bench cells are not in this checkout")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plots.py"), "--out-dir",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("accuracy_vs_macs.png", "anytime.png"):
        assert (tmp_path / name).stat().st_size > 10_000
        assert f"docs/img/{name}" in (ROOT / "README.md").read_text()


@pytest.mark.skipif(shutil.which("mkdocs") is None and
                    importlib.util.find_spec("mkdocs") is None, reason="needs mkdocs (dev extra)")
def test_site_builds_strictly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                       env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in caproj.__all__:
        assert f'id="caproj.{name}"' in api, name
