"""What `caproj.compress` gives with its defaults only, as a new user calls it (issue 31).

Label-free: N unlabeled CIFAR-10 training images (a seeded subset of the JPEG train split,
normalised, not augmented) handed to the API as a plain list of bare tensor batches, nothing
else set but the MACs target; top-1 on the 10,000 test images. The labelled defaults-only runs
go through the CLI (`caproj compress ... --target-macs T --finetune-epochs 3`, RESULTS.md).

    python benchmarks/defaults.py --arch resnet20 --target 0.5 --images 1000 --seed 0 \
        --out benchmarks/out/defaults/r20-label-free-1000-s0.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.models import load_model  # noqa: E402
from caproj.utils import atomic_write_text, run_record  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="the subset and compress's seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a compress option on top of the defaults (a probe, recorded), e.g. "
                    "--set 'finetune={\"epochs\": 0, \"augment\": true}'")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in a.set)}
    torch.set_num_threads(a.threads)
    data = load_data(str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    test = Batches.test_of(data, 500)
    model, _ = load_model(str(SHARED / "models" / f"{a.arch}-cifar10jpeg.th"), a.arch, 10)
    g = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(data.train_x), generator=g)[:a.images]
    images = list(Batches(data.train_x[idx], None, 128, data.mean, data.std))  # bare tensors
    t0 = time.perf_counter()
    res = caproj.compress(model, images, target_macs=a.target, eval_data=test, seed=a.seed,
                          progress=False, **extra)
    rep = res.report
    out = {"arch": a.arch, "target_macs": a.target, "images": a.images, "labels": False,
           "options": extra,
           "acc_original": rep["acc_before"], "acc_after_compress": rep["acc_after_compress"],
           "acc_final": caproj.evaluate(res.model, test, progress=False)["acc"],
           "preset": rep["preset"], "budget": rep["budget"], "widths": res.widths,
           "allocation": rep.get("allocation"),
           "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
           "cap_config": rep.get("cap_config"), "finetune_config": rep.get("finetune_config"),
           "seconds": time.perf_counter() - t0,
           "command": "python " + " ".join(shlex.quote(v) for v in sys.argv),
           **run_record(a.seed), "threads": a.threads}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=1, default=str), a.out)
    print(f"{a.arch} at {a.target:g} MACs from {a.images} unlabeled images, defaults only: "
          f"{out['acc_final']:.2f} % (preset {rep['preset']['name']}; original "
          f"{out['acc_original']:.2f} %), {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
