"""How well the per-layer latency model (caproj.latency) predicts whole-network latency.

For each architecture: the latency model is built (layer times from the cache where present),
then for several width vectors (uniform keep 0.25 / 0.5 / 0.75 and two random ones, seeded)
the narrowed network (shapes only) is measured interleaved with the original, `--repeats`
times, and compared with the prediction:
- `abs_error`: (predicted ms - measured ms) / measured ms, the prediction against a separate
  measurement (includes the machine's drift between the two);
- `ratio_error`: (predicted / original predicted) against (measured / original measured in the
  same interleaved run): the error in the speed-up the model promises;
- `measured_ratio_range`: the repeats' spread, the measurement's own noise.

    python benchmarks/latency_model.py --archs resnet20,resnet56,tv:mobilenet_v2 \
        --runtime onnxruntime --batch 1 --threads 1 --out benchmarks/out/latency/model-ort-b1.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caproj import latency as L  # noqa: E402
from caproj.budget import widths_for_keep  # noqa: E402
from caproj.models import build_model  # noqa: E402
from caproj.sites import require_sites  # noqa: E402
from caproj.utils import run_record  # noqa: E402


def width_sets(sites, multiple: int, seed: int) -> dict[str, list[int]]:
    """Uniform keep ratios and random widths, on each site's measured grid (where a latency
    budget chooses widths)."""
    grids = [g for _, g in L.site_grids(sites, multiple)]

    def snap(w: list[int]) -> list[int]:
        return [min(g, key=lambda v: (abs(v - k), v)) for k, g in zip(w, grids, strict=True)]

    out = {f"uniform {k}": snap(widths_for_keep(sites, k, multiple)) for k in (0.25, 0.5, 0.75)}
    rng = random.Random(seed)
    for i in range(2):
        out[f"random {i}"] = [rng.choice(g) for g in grids]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="resnet20,resnet56,tv:mobilenet_v2")
    ap.add_argument("--runtime", default="onnxruntime", choices=L.RUNTIMES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    spec = L.Spec(a.runtime, a.batch, a.threads)
    rows: list[dict] = []
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for arch in a.archs.split(","):
        size = 224 if arch.startswith("tv:") else 32
        shape = (3, size, size)
        model = build_model(arch, num_classes=1000 if arch.startswith("tv:") else 10).eval()
        sites = require_sites(model)
        t0 = time.perf_counter()
        lm = L.LatencyModel.build(model, sites, shape, spec, a.multiple)
        build_s = time.perf_counter() - t0
        print(f"{arch}: {len(sites)} sites, {len(lm.entries)} layers, original {lm.full_ms:.3f} "
              f"ms, {lm.measured_layers} layer times measured in {build_s:.0f} s", flush=True)
        for name, w in width_sets(sites, a.multiple, a.seed).items():
            small = L.shape_only(model, sites, w)
            r = L.compare({"original": model, "compressed": small}, shape, spec, a.repeats)
            pred = lm.predict(w)
            meas = r["compressed"]["median_ms"]
            spread = [1 / s for s in r["compressed"]["repeats_speedup"]]
            row = {"arch": arch, "widths_name": name, "widths": w, "predicted_ms": pred,
                   "measured_ms": meas, "original_ms_model": lm.full_ms,
                   "original_ms_run": r["original"]["median_ms"],
                   "predicted_ratio": pred / lm.full_ms,
                   "measured_ratio": 1 / r["compressed"]["speedup"],
                   "abs_error": L.prediction_error(pred, meas),
                   "ratio_error": L.prediction_error(pred / lm.full_ms,
                                                     1 / r["compressed"]["speedup"]),
                   "repeats_speedup": r["compressed"]["repeats_speedup"],
                   "measured_ratio_range": [min(spread), max(spread)],
                   "build_seconds": build_s, "measured_layers": lm.measured_layers}
            rows.append(row)
            print(f"  {name:12s} predicted {pred:8.3f} ms ({row['predicted_ratio']:.3f}) "
                  f"measured {meas:8.3f} ms ({row['measured_ratio']:.3f})  abs err "
                  f"{100 * row['abs_error']:+5.1f} %  ratio err {100 * row['ratio_error']:+5.1f} % "
                  f"(repeats measured {min(spread):.3f}-{max(spread):.3f})",
                  flush=True)
            path.write_text(json.dumps({"spec": spec.__dict__, "machine": L.machine(),
                                        "rows": rows, "command": " ".join(sys.argv),
                                        **run_record(a.seed)}, indent=1))
    for arch in a.archs.split(","):
        errs = [abs(r["ratio_error"]) for r in rows if r["arch"] == arch]
        abs_errs = [abs(r["abs_error"]) for r in rows if r["arch"] == arch]
        print(f"{arch}: |ratio error| median {100 * statistics.median(errs):.1f} % max "
              f"{100 * max(errs):.1f} %; |abs error| median "
              f"{100 * statistics.median(abs_errs):.1f} % max {100 * max(abs_errs):.1f} %")


if __name__ == "__main__":
    main()
