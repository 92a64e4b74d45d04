"""Quick probes behind the label-free diagnosis (RESULTS.md, issue 19): CaP on a subset of the
CIFAR-10 training split, printing top-1 after compression and (step, loss, reconstruction)
every 25 steps. Cells: `unl:N` (N images, no labels) or `lab:N` (with labels), then
`:option=value` CaP options. `calib_images` is min(N, 1000). The logs of the runs quoted in
RESULTS.md are in benchmarks/out/label-free/probes/ (stdout only: these probes write no JSON).

    python benchmarks/label_free_probe.py resnet56 600 unl:1000 lab:1000
    python benchmarks/label_free_probe.py resnet56 600 unl:1000:weight_lr=0.0001:lr=0.0003
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import label_free as LF  # noqa: E402

import caproj  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.models import load_model  # noqa: E402


def main() -> None:
    data = load_data(str(LF.DATA))
    test = Batches.test_of(data, 500)
    arch, steps = sys.argv[1], int(sys.argv[2])
    model, _ = load_model(str(LF._weights(arch)), arch, 10)
    for kind in sys.argv[3:]:
        mode, n, *extra = kind.split(":")
        n = int(n)
        opts = {k: LF._value(v) for k, v in (o.split("=", 1) for o in extra)}
        train, calib = LF._subset(data, n, 0, labels=mode == "lab")
        t = time.time()
        res = caproj.compress(model, train, preset=None,
                              calib_data=calib, target_macs=0.5, steps=steps,
                              eval_data=test, progress=False, calib_images=min(n, 1000), **opts)
        h = res.report["cap_history"]
        print(kind, round(time.time() - t), res.report["acc_after_compress"],
              [(r["step"], round(r["loss"], 2), round(r["recon"], 3)) for r in h[::25]],
              flush=True)


if __name__ == "__main__":
    main()
