"""Training throughput of ResNet-20 on the CIFAR-10 JPEG train split: caproj's engine against a
plain eager PyTorch loop (torchvision ImageFolder + per-sample transforms + DataLoader, fp32,
NCHW), measured in the same run on this machine.

    python benchmarks/train_throughput.py --out benchmarks/out/throughput.json

Each variant trains `--steps` steps of batch 128 after `--warmup` steps; images/s is
steps*128 / wall time. The caproj rows isolate each option (tensor-resident data, channels_last,
bf16 autocast, torch.compile) so that what is kept is kept for a measured reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caproj.data import IMAGENET_MEAN, IMAGENET_STD, Batches, load_data  # noqa: E402
from caproj.models import build_model  # noqa: E402
from caproj.utils import run_record  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def plain_loop(root: Path, steps: int, warmup: int, workers: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = ImageFolder(str(root / "train"), tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers,
                                     drop_last=True, persistent_workers=workers > 0)
    model = build_model("resnet20").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    return _images_per_s(iter(dl), lambda x, y: F.cross_entropy(model(x), y), opt, steps,
                         warmup)


def _images_per_s(it, loss_fn, opt, steps: int, warmup: int) -> float:
    """Train steps of batch 128 from `it`; images/s over `steps` after `warmup` steps."""
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert t0 is not None
    return steps * 128 / (time.perf_counter() - t0)


def engine_loop(data, steps: int, warmup: int, channels_last: bool, bf16: bool,
                compile: bool) -> float:
    model = build_model("resnet20").train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    fwd = torch.compile(model) if compile else model
    batches = Batches.train_of(data, 128, channels_last=channels_last)

    def loss_fn(x, y):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return F.cross_entropy(fwd(x).float(), y)

    return _images_per_s(iter(batches), loss_fn, opt, steps, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []

    def rec(name, ips, **kw):
        rows.append({"variant": name, "images_per_s": round(ips, 1),
                     "epoch_s": round(50000 / ips, 1), **kw})
        print(f"{name:58s} {ips:7.0f} img/s  ({50000 / ips:5.0f} s/epoch)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(a.data) as t:
            t.extractall(tmp, filter="data")
        root = next(p.parent for p in Path(tmp).rglob("train") if p.is_dir())
        for workers in (2, 0):
            rec(f"plain: ImageFolder+DataLoader(workers={workers}), fp32 NCHW",
                plain_loop(root, a.steps, a.warmup, workers), workers=workers)
    data = load_data(a.data)
    variants = [("caproj data, fp32 NCHW", False, False, False),
                ("caproj data, fp32 channels_last", True, False, False),
                ("caproj data, bf16 autocast NCHW", False, True, False),
                ("caproj data, bf16 autocast + channels_last (default)", True, True, False)]
    if a.compile:
        variants.append(("caproj data, bf16 + channels_last + torch.compile", True, True, True))
    for name, cl, bf, comp in variants:
        rec(name, engine_loop(data, a.steps, a.warmup, cl, bf, comp))
    plain = rows[0]["images_per_s"]
    for r in rows:
        r["vs_plain"] = round(r["images_per_s"] / plain, 2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rows": rows, "steps": a.steps, **run_record(0)},
                                      indent=2))
    print(f"default engine vs plain loop: {rows[-1 - a.compile]['vs_plain']}x")


if __name__ == "__main__":
    main()
