"""Issue 35 probe: does the calibration over-fit its images, and does a stronger pull of the
refit (damping, ridge, ridge toward W P, layer targets) help? MobileNetV2 at --target MACs,
calibrated on 500 - --hold images of the calibration half (a seeded slice is held out), the
`calibration` preset's settings with each `;`-separated variant's CapConfig overrides (the
widths are measured by the first variant and re-used); top-1 and agreement on the evaluation
half, agreement on the held-out calibration images and on the calibration images themselves.
Each variant's network is saved beside --out (OUT-vK.pt) for benchmarks/mnv2_distil_probe.py.

    python benchmarks/mnv2_refit_sweep.py --out /tmp/c50-h50-r \\
        --variants "ridge=0.001;ridge=0.01;ridge=0.1;refit_target=layer"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mobilenet_imagenet import _value  # noqa: E402  (this folder is on the path)

import caproj  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.plan import Plan  # noqa: E402
from caproj.utils import seed_everything  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hold", type=int, default=50)
    ap.add_argument("--variants", default="damping=1")
    ap.add_argument("--alloc", default="auto")
    a = ap.parse_args()
    seed_everything(0)
    data = load_data(str(SHARED / "data" / "imagenet-sample-1000.tar.gz"), 224, split=500)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(SHARED / "models" / "mobilenet_v2-imagenet-int8dq.pt",
                                     weights_only=True))
    model.eval()
    shape = (3, 224, 224)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    tr, ho = data.train_x[perm[a.hold:]], data.train_x[perm[:a.hold]]
    calib = list(Batches(tr, None, 100, data.mean, data.std))
    held = list(Batches(ho, None, 100, data.mean, data.std)) if a.hold else []
    test = [x for x, _ in Batches(data.test_x, data.test_y, 100, data.mean, data.std)]
    plan = Plan.of(model, shape, target_macs=a.target, allocation=a.alloc)

    @torch.no_grad()
    def preds(m, bs):
        return torch.cat([m(x).argmax(1) for x in bs])

    ref_test, ref_held, ref_calib = preds(model, test), preds(model, held), preds(model, calib)
    pct = lambda b: 100 * b.float().mean().item()
    rows = []
    for k, var in enumerate(a.variants.split(";")):
        kw = {"refit_target": "block", "damping": 1.0,
              **{p.split("=")[0]: _value(p.split("=")[1]) for p in var.split(",") if p}}
        t1 = time.perf_counter()
        cap = caproj.CaP(model, torch.zeros(1, *shape), plan=plan, calib_images=len(tr),
                         steps=0, batch_size=32, progress=False, seed=0, **kw)
        cap.calibrate(calib)
        small = cap.finalize()
        st = preds(small, test)
        res = {"kw": kw, "secs": time.perf_counter() - t1, "top1": pct(st == data.test_y),
               "agree": pct(st == ref_test), "tr_agree": pct(preds(small, calib) == ref_calib)}
        if a.hold:
            res["ho_agree"] = pct(preds(small, held) == ref_held)
        print(res, flush=True)
        rows.append(res)
        Path(a.out + ".json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
        caproj.save(small, a.out + f"-v{k}.pt", arch="tv:mobilenet_v2")


if __name__ == "__main__":
    main()
