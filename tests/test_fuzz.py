"""Property test over random small CNNs (caproj.fuzz): convs with and without bias, BN before or
after the activation, depthwise and grouped convs, residual adds, concatenations, SE gates,
average-pool and flatten heads, random widths. For each: keep=1.0 reproduces the logits and
target_macs=0.5 gives a network within the budget, or one line of CaprojError; never a
traceback. Seeded (derandomized), so CI runs the same 200 networks every time;
benchmarks/fuzz.py runs thousands."""

from __future__ import annotations

import logging
import random

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="needs the hypothesis package (dev extra)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from caproj.fuzz import FuzzNet, draw_spec, run_case  # noqa: E402

SEEN: dict[str, int] = {}


@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_random_cnns_compress_or_refuse_in_one_line(seed):
    logging.getLogger("caproj").setLevel(logging.ERROR)
    spec = draw_spec(random.Random(seed))
    r = run_case(spec, seed)
    SEEN[r["outcome"]] = SEEN.get(r["outcome"], 0) + 1
    assert r["outcome"] != "failed", (spec, r)


def test_the_generated_networks_cover_every_structure():
    kinds, groups, bn, heads = set(), set(), set(), set()
    for seed in range(200):
        spec = draw_spec(random.Random(seed))
        heads.add(spec["head"])
        for b in spec["blocks"]:
            kinds.add(b["kind"])
            groups.add(b["groups"])
            bn.add(b["bn"])
        FuzzNet(spec)  # builds
    assert kinds == {"conv", "res", "cat", "se", "pool"}
    assert groups == {"one", "depthwise", "grouped"} and bn == {"before", "after", "none"}
    assert heads == {"avg", "flatten"}
