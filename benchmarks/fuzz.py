"""Fuzzing over random small CNNs (caproj.fuzz, the generator tests/test_fuzz.py runs 200 of):
N seeded networks, each compressed at keep=1.0 and at target_macs=0.5; the outcomes counted
and every failure (a traceback, a multi-line error, logits that differ, MACs over the budget)
listed with its seed and spec. Refusals are counted by their message's first words.

    python benchmarks/fuzz.py --n 5000 --out benchmarks/out/fuzz/fuzz-5000.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caproj.fuzz import draw_spec, run_case  # noqa: E402
from caproj.utils import atomic_write_text, run_record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logging.getLogger("caproj").setLevel(logging.ERROR)
    counts: collections.Counter[str] = collections.Counter()
    refusals: collections.Counter[str] = collections.Counter()
    failures = []
    t0 = time.perf_counter()
    for seed in range(a.first_seed, a.first_seed + a.n):
        spec = draw_spec(random.Random(seed))
        r = run_case(spec, seed)
        counts[r["outcome"]] += 1
        if r["outcome"] == "refused":
            refusals[" ".join(r["error"].split()[:4])] += 1
        elif r["outcome"] == "failed":
            failures.append({"seed": seed, "spec": spec, **r})
    out = {"n": a.n, "first_seed": a.first_seed, "outcomes": dict(counts),
           "refusals": dict(refusals.most_common()), "failures": failures,
           "seconds": time.perf_counter() - t0, "threads": a.threads,
           "command": "python " + " ".join(shlex.quote(v) for v in sys.argv), **run_record(0)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=1, default=str), a.out)
    print(json.dumps({k: out[k] for k in ("outcomes", "refusals", "seconds")}, indent=1))
    for f in failures[:20]:
        print(f["seed"], f["where"], f["error"][:200])


if __name__ == "__main__":
    main()
