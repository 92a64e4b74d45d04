"""How long CaP's calibration takes (statistics, initial P, cascaded least-squares refit), and
the accuracy it gives, on ResNet-56 at 50 % MACs from 2,000 calibration images (no steps).

Run it at two commits to compare the refit (issue 32: the graph walk that pauses at each
consumer against the per-consumer prefix re-runs it replaced):

    python benchmarks/refit_time.py --out benchmarks/out/engine/refit-after.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caproj.cap import CaP  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.models import load_model  # noqa: E402
from caproj.train import evaluate  # noqa: E402
from caproj.utils import atomic_write_text, run_record  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--calib-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_data(str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    calib = Batches.subset_of(data, a.calib_images, 250, seed=0)
    model, _ = load_model(str(SHARED / "models" / f"{a.arch}-cifar10jpeg.th"), a.arch, 10)
    t0 = time.perf_counter()
    cap = CaP(model, torch.zeros(1, 3, 32, 32), target_macs=a.target, steps=0,
              calib_images=a.calib_images, log_every=0)
    cap.calibrate(calib)
    wall = time.perf_counter() - t0
    acc = evaluate(cap.finalize(), Batches.test_of(data, 500), progress_bar=False)["acc"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = {"arch": a.arch, "target_macs": a.target, "calib_images": a.calib_images,
           "commit": commit, "timings": cap.timings, "wall_s": wall, "acc": acc,
           "threads": a.threads,
           "command": "python " + " ".join(shlex.quote(v) for v in sys.argv), **run_record(0)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=1, default=str), a.out)
    print(json.dumps({k: out[k] for k in ("timings", "wall_s", "acc")}, indent=1))


if __name__ == "__main__":
    main()
