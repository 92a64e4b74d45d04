"""How long post-training calibration takes on an ImageNet network, as a user runs it:
`caproj.compress(model, 500 unlabeled images, target_macs=T, steps=0)` on torchvision's
MobileNetV2 at 224², defaults otherwise; wall time of the call (and the process's user/system
CPU time), then top-1 and agreement with the original on the held-out 500.

    python benchmarks/mnv2_calibration_time.py --target 0.7 \
        --out benchmarks/out/mnv2/calibration-time-0.7.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj.batches import WithoutLabels  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.utils import atomic_write_text, run_record  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def cpu_seconds() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


@torch.no_grad()
def top1(model, test, ref=None) -> tuple[float, float, torch.Tensor]:
    preds, ys = [], []
    for x, y in test:
        preds.append(model(x).argmax(1))
        ys.append(y)
    p, y = torch.cat(preds), torch.cat(ys)
    agree = 100.0 * float((p == ref).float().mean()) if ref is not None else 100.0
    return 100.0 * float((p == y).float().mean()), agree, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    weights = SHARED / "models" / "mobilenet_v2-imagenet-int8dq.pt"
    archive = SHARED / "data" / "imagenet-sample-1000.tar.gz"
    for f in (weights, archive):
        if not f.exists():
            sys.exit(f"mnv2_calibration_time: {f} not found (needs ../shared)")
    import torchvision

    torch.set_num_threads(a.threads)
    data = load_data(str(archive), 224, split=500)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    calib = WithoutLabels(Batches(data.train_x, data.train_y, 50, data.mean, data.std))
    test = Batches(data.test_x, data.test_y, 100, data.mean, data.std)
    acc0, _, ref = top1(model, test)
    u0, s0 = cpu_seconds()
    t0 = time.perf_counter()
    res = caproj.compress(model, calib, target_macs=a.target, steps=0, calib_images=500,
                          seed=a.seed, progress=False)
    wall = time.perf_counter() - t0
    u1, s1 = cpu_seconds()
    acc, agree, _ = top1(res.model, test, ref)
    out = {"target_macs": a.target, "wall_s": wall, "user_s": u1 - u0, "system_s": s1 - s0,
           "top1_original": acc0, "top1": acc, "agreement": agree,
           "macs_fraction": res.report["macs_after"] / res.report["macs_before"],
           "preset": res.report.get("preset"), "cap_timings": res.report.get("cap_timings"),
           "widths": res.widths, **run_record(a.seed)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=1, default=str), a.out)
    print(f"MobileNetV2 at {a.target:.2f} MACs, calibration only from 500 images: "
          f"{wall:.0f} s wall ({u1 - u0:.0f} s user, {s1 - s0:.0f} s system), top-1 {acc:.1f} % "
          f"(original {acc0:.1f} %), agreement {agree:.1f} %")


if __name__ == "__main__":
    main()
