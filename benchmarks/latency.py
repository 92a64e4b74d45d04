"""CPU latency of an original model and its compressed version, measured interleaved in one run,
in each inference form (eager, BN folded, TorchScript-frozen), at batch 1 and 64.

    python benchmarks/latency.py --arch resnet56 --compressed r56-cap.pt \
        --out benchmarks/out/latency-r56.json

Without --compressed, a CaP-shaped model at --target-macs is made by surgery with a selection P
(latency depends on shapes, not on weight values).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caproj import deploy, metrics, surgery  # noqa: E402
from caproj.budget import MacModel, widths_for_macs  # noqa: E402
from caproj.models import build_model, load_model  # noqa: E402
from caproj.sites import require_sites  # noqa: E402
from caproj.utils import run_record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--compressed", help="compressed caproj checkpoint")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--channel-multiple", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forms", default="eager,fold_bn,fold_bn_cl,freeze,onnxruntime")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)  # before any runtime session (onnxruntime) is created
    shape = (3, 32, 32)
    orig = build_model(a.arch).eval()
    if a.compressed:
        small, _ = load_model(a.compressed)
    else:
        sites = require_sites(orig)
        widths = widths_for_macs(MacModel.of(orig, shape), sites, a.target_macs,
                                 a.channel_multiple)
        small = surgery.apply(orig, sites, [torch.eye(s.channels)[:, :k]
                                            for s, k in zip(sites, widths, strict=True)])
    macs = (metrics.count_macs(orig, shape), metrics.count_macs(small, shape))
    widths = [m.out_channels for n, m in small.named_modules() if n.endswith("conv1")][1:]
    print(f"MACs {macs[0] / 1e6:.2f} M -> {macs[1] / 1e6:.2f} M ({macs[0] / macs[1]:.2f}x); "
          f"block widths {widths}")
    rows = []
    for form in a.forms.split(","):
        o, s = (deploy.for_inference(m, form, shape) for m in (orig, small))
        for b in (1, 64):
            r = metrics.compare_latency({"original": o, "compressed": s}, shape, b,
                                        rounds=a.rounds if b == 1 else max(6, a.rounds // 3),
                                        num_threads=a.threads)
            row = {"form": form, "batch": b, "original_ms": r["original"]["median_ms"],
                   "compressed_ms": r["compressed"]["median_ms"],
                   "speedup": r["compressed"]["speedup"]}
            rows.append(row)
            print(f"{form:8s} batch {b:2d}: {row['original_ms']:7.2f} ms -> "
                  f"{row['compressed_ms']:7.2f} ms  speed-up {row['speedup']:.2f}x", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"arch": a.arch, "macs": macs, "rows": rows,
                                       "widths": widths,
                                       "threads": a.threads, **run_record(0)}, indent=2))


if __name__ == "__main__":
    main()
