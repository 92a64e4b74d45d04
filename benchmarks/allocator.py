"""Why batch-64 CPU latency needs a steady allocator: glibc's defaults against fixed thresholds.

For each allocator setting, `--processes` fresh processes each build ResNet-56 and the same
network narrowed to keep 0.75 (shapes only), compile both in inductor (batch 64, BN folded,
channels_last, frozen weights), alternate their forwards for `--seconds`, and record per model
the median time, the ratio of the narrowed to the original (median of adjacent pairs) and
the minor page faults per forward. `system`: glibc's malloc as it starts; `steady`:
`caproj.utils.steady_allocator()` first (mmap and trim thresholds fixed).

    python benchmarks/allocator.py --out benchmarks/out/latency/allocator-b64.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caproj import deploy  # noqa: E402
from caproj import latency as L  # noqa: E402
from caproj.budget import widths_for_keep  # noqa: E402
from caproj.models import build_model  # noqa: E402
from caproj.sites import require_sites  # noqa: E402
from caproj.utils import run_record, steady_allocator  # noqa: E402


def one(allocator: str, seconds: float, keep: float, batch: int, threads: int) -> dict:
    """One process's measurement (run in a fresh interpreter: the setting is process-wide)."""
    applied = steady_allocator() if allocator == "steady" else False
    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10).eval()
    sites = require_sites(model)
    grids = [g for _, g in L.site_grids(sites, 8)]
    w = [min(g, key=lambda v: (abs(v - k), v))
         for k, g in zip(widths_for_keep(sites, keep, 8), grids, strict=True)]
    small = L.shape_only(model, sites, w)
    torch.set_num_threads(threads)
    forms = [deploy.for_inference(m, "inductor", (3, 32, 32), batch=batch) for m in (model, small)]
    x = torch.randn(batch, 3, 32, 32)
    times: list[list[float]] = [[], []]
    with torch.inference_mode():
        for f in forms:
            for _ in range(10):
                f(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            for i, f in enumerate(forms):
                t0 = time.perf_counter()
                f(x)
                times[i].append((time.perf_counter() - t0) * 1e3)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    n = len(times[1])
    return {"allocator": allocator, "steady_applied": applied, "widths": w, "forwards": 2 * n,
            "original_ms": statistics.median(times[0]), "narrow_ms": statistics.median(times[1]),
            "ratio": statistics.median(b / a for a, b in zip(times[0], times[1], strict=False)),
            "faults_per_forward": faults / (len(times[0]) + n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.75)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--child", choices=("system", "steady"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.seconds, a.keep, a.batch, a.threads)))
        return
    if not a.out:
        ap.error("--out is required")
    rows = []
    for i in range(a.processes):
        for alloc in ("system", "steady"):  # alternated, so drift hits both
            r = subprocess.run([sys.executable, __file__, "--child", alloc, "--seconds",
                                str(a.seconds), "--keep", str(a.keep), "--batch", str(a.batch),
                                "--threads", str(a.threads)], capture_output=True, text=True,
                               check=True)
            row = {"process": i, **json.loads(r.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{alloc:6s} process {i}: original {row['original_ms']:.2f} ms, keep {a.keep} "
                  f"{row['narrow_ms']:.2f} ms, ratio {row['ratio']:.3f}, "
                  f"{row['faults_per_forward']:.0f} page faults per forward", flush=True)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "keep": a.keep, "batch": a.batch,
                                "threads": a.threads, "seconds": a.seconds,
                                **run_record(0)}, indent=1))


if __name__ == "__main__":
    main()
