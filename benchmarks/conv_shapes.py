"""Where the batch-64 speed-up of a half-width ResNet-56 goes: CPU time of each distinct 3x3
convolution shape of the original and of the compressed network (widths [8]x9, [16]x9, [32]x9),
measured interleaved in one run, fp32 channels_last, the same threads as the latency benchmark.

    python benchmarks/conv_shapes.py --out benchmarks/out/conv-shapes-r56.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caproj.utils import run_record  # noqa: E402

# (in, out, spatial) of one residual block's two convs, per stage: original and half width
BLOCKS = {
    "stage1": ((16, 16, 32), (16, 16, 32), (16, 8, 32), (8, 16, 32)),
    "stage2": ((32, 32, 16), (32, 32, 16), (32, 16, 16), (16, 32, 16)),
    "stage3": ((64, 64, 8), (64, 64, 8), (64, 32, 8), (32, 64, 8)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    shapes = sorted({s for b in BLOCKS.values() for s in b})
    convs, inputs = {}, {}
    for cin, cout, hw in shapes:
        convs[cin, cout, hw] = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=True).eval().to(
            memory_format=torch.channels_last)
        inputs[cin, cout, hw] = torch.randn(a.batch, cin, hw, hw).to(
            memory_format=torch.channels_last)
    times: dict[tuple, list[float]] = {s: [] for s in shapes}
    with torch.inference_mode():
        for r in range(a.rounds + 3):
            for s in shapes:  # interleaved: every shape once per round
                t0 = time.perf_counter()
                convs[s](inputs[s])
                if r >= 3:
                    times[s].append(time.perf_counter() - t0)
    rows = []
    for s in shapes:
        ms = statistics.median(times[s]) * 1e3
        macs = a.batch * s[0] * s[1] * 9 * s[2] * s[2]
        rows.append({"in": s[0], "out": s[1], "hw": s[2], "ms": ms,
                     "gmacs_per_s": macs / ms / 1e6})
        print(f"{s[0]:3d} -> {s[1]:3d} @ {s[2]:2d}x{s[2]:<2d}: {ms:6.2f} ms "
              f"{macs / ms / 1e6:6.1f} GMAC/s")
    by = {(r["in"], r["out"], r["hw"]): r["ms"] for r in rows}
    stages = {}
    for name, (o1, o2, c1, c2) in BLOCKS.items():
        orig, comp = by[o1] + by[o2], by[c1] + by[c2]
        stages[name] = {"original_ms": orig, "compressed_ms": comp, "speedup": orig / comp}
        print(f"{name}: block convs {orig:.2f} -> {comp:.2f} ms ({orig / comp:.2f}x; MACs 2.00x)")
    tot_o = sum(v["original_ms"] for v in stages.values())
    tot_c = sum(v["compressed_ms"] for v in stages.values())
    print(f"all stages (x9 blocks each): {tot_o / tot_c:.2f}x")
    out = {"batch": a.batch, "threads": a.threads, "rounds": a.rounds, "rows": rows,
           "stages": stages, "convs_speedup": tot_o / tot_c, **run_record(0)}
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
