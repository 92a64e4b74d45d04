"""Does CPU training need the steady allocator too? glibc's defaults against fixed thresholds.

For each allocator setting, `--processes` fresh processes each fine-tune ResNet-56 (seeded,
the bench's recipe: SGD one-cycle, batch 128, bf16 autocast + channels_last where the CPU has
bf16) on the CIFAR-10 JPEG train split for `--steps` steps through `caproj.finetune`, with
and without distillation from a teacher, and record images/s and minor page faults per step.
`system`: glibc's malloc as a fresh process starts; `steady`: `caproj.utils.steady_allocator()`
first (mmap and trim thresholds fixed). Processes alternate, so drift hits both.

    python benchmarks/train_allocator.py --out benchmarks/out/train-allocator.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.models import build_model  # noqa: E402
from caproj.utils import run_record, steady_allocator  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def one(allocator: str, steps: int, kd: float, threads: int, data: str) -> dict:
    """One process's measurement (a fresh interpreter: the setting is process-wide)."""
    applied = steady_allocator() if allocator == "steady" else False
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    splits = load_data(data)
    train = Batches.train_of(splits, 128, seed=0)
    model = build_model("resnet56", num_classes=10)
    teacher = build_model("resnet56", num_classes=10).eval() if kd else None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    caproj.finetune(model, train, epochs=1, max_steps=steps, teacher=teacher, kd_weight=kd,
                    lr=0.02, progress=False)
    wall = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"allocator": allocator, "steady_applied": applied, "kd": kd, "steps": steps,
            "images_per_s": steps * 128 / wall, "faults_per_step": faults / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--out")
    ap.add_argument("--child", choices=("system", "steady"), help=argparse.SUPPRESS)
    ap.add_argument("--kd", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.steps, a.kd, a.threads, a.data)))
        return
    if not a.out:
        ap.error("--out is required")
    rows = []
    for kd in (0.0, 0.5):
        for i in range(a.processes):
            for alloc in ("system", "steady"):
                r = subprocess.run([sys.executable, __file__, "--child", alloc, "--kd", str(kd),
                                    "--steps", str(a.steps), "--threads", str(a.threads),
                                    "--data", a.data], capture_output=True, text=True, check=True)
                row = {"process": i, **json.loads(r.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"kd {kd} {alloc:6s} process {i}: {row['images_per_s']:.0f} images/s, "
                      f"{row['faults_per_step']:.0f} page faults per step", flush=True)
    summary = {f"kd{kd}_{al}_median_images_per_s": statistics.median(
        r["images_per_s"] for r in rows if r["kd"] == kd and r["allocator"] == al)
        for kd in (0.0, 0.5) for al in ("system", "steady")}
    print(json.dumps(summary, indent=1))
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "summary": summary, "steps": a.steps,
                                "threads": a.threads, **run_record(0)}, indent=1))


if __name__ == "__main__":
    main()
