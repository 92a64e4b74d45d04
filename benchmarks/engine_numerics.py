"""Same numerics before and after a refactoring of the training engines (issue 32).

ResNet-20 (../shared/models/resnet20-cifar10jpeg.th) at 50 % MACs, seed 0, caproj's plain
defaults (`preset=None`): CaP's loss history of its first 20 steps, top-1 with no fine-tuning,
then top-1 after a 1-epoch fine-tune (the default fine-tune recipe, KD 0.5 from the original).
Run it at two commits and compare the JSONs:

    python benchmarks/engine_numerics.py --out benchmarks/out/engine/after.json
    python benchmarks/engine_numerics.py --compare benchmarks/out/engine/before.json \
        benchmarks/out/engine/after.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
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


def measure(threads: int) -> dict:
    torch.set_num_threads(threads)
    data = load_data(str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    train = Batches.train_of(data, 128, seed=0)
    calib = Batches.subset_of(data, 2000, 250, seed=0)
    test = Batches.test_of(data, 500)
    model, _ = load_model(str(SHARED / "models" / "resnet20-cifar10jpeg.th"), "resnet20", 10)
    t0 = time.perf_counter()
    res = caproj.compress(model, train, target_macs=0.5, calib_data=calib, eval_data=test,
                          seed=0, preset=None, progress=False)
    cap_s = time.perf_counter() - t0
    acc_cap = caproj.evaluate(res.model, test, progress=False)["acc"]
    t0 = time.perf_counter()
    ft = caproj.finetune(res.model, train, epochs=1, teacher=model, kd_weight=0.5, seed=0,
                         eval_data=test, progress=False)
    hist = res.report["cap_history"][:20]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"commit": commit, "widths": res.widths, "acc_no_finetune": acc_cap,
            "acc_finetune_1": caproj.evaluate(res.model, test, progress=False)["acc"],
            "finetune_history": ft, "cap_history_20": hist, "cap_seconds": cap_s,
            "finetune_seconds": time.perf_counter() - t0}


def compare(a: dict, b: dict, tol: float = 1e-4) -> list[str]:
    """Differences beyond float tolerance (accuracies are compared exactly: 0.01 % is one
    image)."""
    out = []
    for k in ("widths", "acc_no_finetune", "acc_finetune_1"):
        if a[k] != b[k]:
            out.append(f"{k}: {a[k]} -> {b[k]}")
    for ra, rb in zip(a["cap_history_20"], b["cap_history_20"], strict=True):
        for k in ("loss", "ce", "recon"):
            if not math.isclose(ra[k], rb[k], rel_tol=tol, abs_tol=1e-7):
                out.append(f"step {ra['step']} {k}: {ra[k]} -> {rb[k]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    a = ap.parse_args()
    if a.compare:
        before, after = (json.loads(Path(p).read_text()) for p in a.compare)
        diffs = compare(before, after)
        print("\n".join(diffs) if diffs else
              f"same numerics: {after['acc_no_finetune']:.2f} % / {after['acc_finetune_1']:.2f} "
              f"%, 20 CaP steps equal within 1e-4 ({before['commit'][:7]} -> "
              f"{after['commit'][:7]})")
        sys.exit(1 if diffs else 0)
    out = {**measure(a.threads), **run_record(0), "threads": a.threads,
           "command": "python " + " ".join(shlex.quote(v) for v in sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=1, default=str), a.out)
    print(f"no fine-tuning {out['acc_no_finetune']:.2f} %, 1 epoch {out['acc_finetune_1']:.2f} %")


if __name__ == "__main__":
    main()
