"""Every bad input in bad_inputs_cases.CASES gets exit 2, one line naming the problem, and no
output file (the table of messages in docs/bad-inputs.md is generated from the same cases)."""

from __future__ import annotations

import re

import pytest
from bad_inputs_cases import API_CASES, CASES, OUTPUTS, make_files

from caproj.errors import CaprojError

from conftest import ROOT, caproj, caproj_in_process


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    make_files(d)
    return d


@pytest.mark.parametrize("what, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_no_output(files, what, args, message, monkeypatch):
    monkeypatch.setattr("caproj.latency.LAYER_SECONDS", 0.03)  # messages, not timings
    r = caproj_in_process(*args, cwd=files)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caproj: error:"), r.stderr
    assert message in lines[0]
    for name in OUTPUTS:
        assert not (files / name).exists(), f"{name} written by a refused run"
    assert not list(files.glob(".o.*"))  # no temp file left behind


@pytest.mark.parametrize("case", [0, 9, 20])
def test_bad_input_as_the_command_line_runs_it(files, case):
    """The same cases as users run them (a `caproj` process each): the in-process runs above
    check every message; these check the process's exit code, stderr and files."""
    what, args, message = CASES[case]
    r = caproj(*args, cwd=files)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == \
        [ln for ln in r.stderr.strip().splitlines() if ln.startswith("caproj: error:")]
    assert message in r.stderr
    for name in OUTPUTS:
        assert not (files / name).exists(), f"{name} written by a refused run"


@pytest.mark.parametrize("what, call, fn, message, param", API_CASES,
                         ids=[c[0] for c in API_CASES])
def test_library_bad_input_raises_caproj_error_naming_the_parameter(what, call, fn, message,
                                                                    param):
    with pytest.raises(CaprojError) as e:
        fn()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert e.value.param == param


def test_docs_table_lists_every_case():
    doc = (ROOT / "docs" / "bad-inputs.md").read_text()
    rows = re.findall(r"^\| \d+ \| (.+?) \|", doc, flags=re.M)
    want = [c[0] for c in CASES] + [c[0] for c in API_CASES]
    assert rows == want, "regenerate: python scripts/bad_inputs_table.py"
    assert len(rows) >= 40
