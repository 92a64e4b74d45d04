"""Whether each start fits its training data (`caproj.measure_fit`: the `learn` preset's
rule), as `caproj compress` measures it (its 2,000 unaugmented calibration images against the
test split). Before issue 31 the same rule picked the "learn" or "polish" fine-tune recipe.

    python benchmarks/recipe_probe.py --out benchmarks/out/deep/recipe/probe.json

Issue 17 item 4: the PNG-trained ResNet-20/56 (81.03 / 83.20 % on the JPEG copy) have to learn
the JPEG data; the `-cifar10jpeg` ones were adapted to it. Writes one JSON record per start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import caproj
from caproj.config import CAP
from caproj.data import Batches, load_data
from caproj.models import load_model
from caproj.utils import atomic_write_text, run_record

SHARED = Path(__file__).resolve().parents[2] / "shared"
STARTS = ["resnet20-12fca82f", "resnet20-cifar10jpeg", "resnet56-4bfd9763",
          "resnet56-cifar10jpeg"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--models", default=str(SHARED / "models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    data = load_data(a.data)
    calib = Batches.subset_of(data, CAP.calib_images, 250, seed=a.seed)
    test = Batches.test_of(data, 500)
    rows = []
    for name in STARTS:
        model, _ = load_model(Path(a.models) / f"{name}.th", name.split("-")[0], 10)
        pick = caproj.measure_fit(model, calib, test)
        pick["recipe"] = "polish" if pick["fits"] else "learn"  # the name the JSON keeps
        rows.append({"start": name, **pick,
                     "test_acc": caproj.evaluate(model, test, progress=False)["acc"]})
        print(f"{name}: {'fits' if pick['fits'] else 'does not fit: learn'} (training loss "
              f"{pick['train_loss']:.3f}, test loss {pick['test_loss']:.3f}, ratio "
              f"{pick['ratio']:.2f})")
    atomic_write_text(json.dumps({"rows": rows, **run_record(a.seed)}, indent=2), Path(a.out))


if __name__ == "__main__":
    main()
