"""ImageNet-scale check: torchvision's ImageNet MobileNetV2 compressed from 500 real ImageNet
images alone (no labels used), evaluated on the other 500 (top-1, and agreement with the
original model's top-1), caproj against Torch-Pruning at the same widths and the same images.

    python benchmarks/mobilenet_imagenet.py --targets 0.7,0.5 --steps 200 \
        --out benchmarks/out/mnv2-imagenet.json

Per target: the site widths for the MACs target (uniform, depthwise expansion sites included);
- caproj before optimisation (selection + cascaded least-squares refit; calibration only) and
  after `--steps` label-free CaP steps (distillation from the original + reconstruction);
- Torch-Pruning group-L2 at the same widths: as pruned, with its BatchNorm statistics
  re-estimated on the 500 images, and after label-free distillation on the same 500 images for
  the same number of images CaP's steps consumed (steps x batch).
`--synthetic N` makes it data-free: both methods calibrate (and distil) on N images synthesised
from the model's BatchNorm statistics (`caproj.synthesize`, `--synth-steps` per batch of
`--synth-batch`; kept in caproj's cache and re-used) instead of the 500 real ones; the held-out
500 real images are still the test set, so the rows compare with the real-image ones.
`--distil-epochs E` adds caproj's label-free distillation after the calibration
(`caproj.finetune` with the teacher, `--ft` TrainConfig overrides, e.g.
optimizer=adam,lr=1e-4,freeze_bn=true,mixup=1): `--holdout K` of the calibration images are kept
out of both the calibration and the distillation, and the weights that distil best onto them
(the calibrated start's included) are kept. The evaluation half is never looked at.
Inputs: ../shared/models/mobilenet_v2-imagenet-int8dq.pt, ../shared/data/imagenet-sample-1000.tar.gz
(images resized to short side 256, centre crop 224: torchvision's eval transform).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj.batches import WithoutLabels  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.methods import torch_pruning_l2  # noqa: E402
from caproj.metrics import count_macs  # noqa: E402
from caproj.plan import Plan  # noqa: E402
from caproj.surgery import recalibrate_bn  # noqa: E402
from caproj.utils import atomic_write_text, run_record, seed_everything  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@torch.no_grad()
def measure(model, test, ref_top1) -> dict:
    model.eval()
    dev = next(model.parameters()).device
    hits, agree, n = 0, 0, 0
    preds = []
    for x, y in test:
        p = model(x.to(dev)).argmax(1).cpu()
        y = y.cpu()
        preds.append(p)
        hits += int((p == y).sum())
        n += len(y)
    preds = torch.cat(preds)
    if ref_top1 is not None:
        agree = int((preds == ref_top1).sum())
    return {"top1": 100 * hits / n, "agree": 100 * agree / n if ref_top1 is not None else 100.0,
            "n": n, "preds": preds}


def views(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` views of each image in `x` (uint8 N x C x H x W): the image, its mirror, then seeded
    random-resized crops (scale 0.35-1, aspect 3/4-4/3, flipped at random) back to H x W."""
    from torchvision.transforms import v2

    out = [x, x.flip(-1)][:n]
    g = torch.Generator().manual_seed(seed)
    crop = v2.RandomResizedCrop(x.shape[-2:], scale=(0.35, 1.0), antialias=True)
    for _ in range(n - 2):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
        v = torch.stack([crop(im) for im in x])
        flip = torch.rand(len(x), generator=g) < 0.5
        v[flip] = v[flip].flip(-1)
        out.append(v)
    return torch.cat(out)


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(SHARED / "models" / "mobilenet_v2-imagenet-int8dq.pt"))
    ap.add_argument("--data", default=str(SHARED / "data" / "imagenet-sample-1000.tar.gz"))
    ap.add_argument("--split", type=int, default=500)
    ap.add_argument("--targets", default="0.7,0.5")
    ap.add_argument("--allocations", default="uniform,auto",
                    help="width allocations to run (Torch-Pruning gets the same widths)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cap", default="", help="CapConfig overrides for caproj, e.g. "
                    "relax=consumer,weight_lr=1e-5")
    ap.add_argument("--no-tp", action="store_true", help="caproj rows only")
    ap.add_argument("--distil-epochs", type=int, default=0,
                    help="label-free distillation epochs after the calibration (caproj.finetune)")
    ap.add_argument("--distil", default="caproj,tp-l2",
                    help="which methods' networks get the distillation")
    ap.add_argument("--ft", default="", help="TrainConfig overrides for the distillation")
    ap.add_argument("--holdout", type=int, default=0,
                    help="calibration images kept out of calibration and distillation, on which "
                    "the best distilled weights are chosen")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="calibrate on this many synthetic images instead of the real ones")
    ap.add_argument("--synth-steps", type=int, default=caproj.SYNTH.steps)
    ap.add_argument("--synth-batch", type=int, default=caproj.SYNTH.batch_size)
    ap.add_argument("--calib-views", type=int, default=1,
                    help="calibrate on V views of each calibration image: 1 the image, 2 + its "
                    "mirror, 3.. + seeded random-resized crops (scale 0.35-1, random flips)")
    ap.add_argument("--stream", action="store_true",
                    help="narrow the residual streams too (Plan.of(stream_projection=True))")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    for f in (a.weights, a.data):
        if not Path(f).exists():
            sys.exit(f"mobilenet_imagenet: {f} not found (needs ../shared)")
    import torchvision

    seed_everything(a.seed)
    dev = torch.device(a.device)
    t0 = time.perf_counter()
    data = load_data(a.data, 224, split=a.split)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(a.weights, weights_only=True))
    model = model.to(dev).eval()
    cx = data.train_x
    held = None
    if a.holdout:  # a seeded slice of the calibration images, never the evaluation half
        perm = torch.randperm(len(cx), generator=torch.Generator().manual_seed(a.seed))
        held = WithoutLabels(Batches(cx[perm[:a.holdout]], None, 100, data.mean, data.std,
                                     device=dev))
        cx = cx[perm[a.holdout:]]
    cviews = views(cx, a.calib_views, a.seed)
    calib = Batches(cx, None, a.batch_size, data.mean, data.std, train=True,
                    flip=True, seed=a.seed, device=dev)  # flips only (no crop at 224)
    calib_eval = Batches(cviews, None, 100, data.mean, data.std, device=dev)
    test = Batches(data.test_x, data.test_y, 100, data.mean, data.std, device=dev)
    unlabeled, calib_bare = WithoutLabels(calib), WithoutLabels(calib_eval)
    shape = (3, 224, 224)
    synth = None
    if a.synthetic:  # caproj's own cache (keyed by weights, settings and n) re-uses a set
        t1 = time.perf_counter()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        syn = caproj.synthesize(model, a.synthetic, shape, steps=a.synth_steps,
                                batch_size=a.synth_batch, seed=a.seed, cache=True,
                                state_path=str(Path(a.out).with_suffix("")), resume=True,
                                progress=False)
        synth = {k: v for k, v in syn.report.items() if k != "batches"}
        unlabeled = syn.batches(a.batch_size, train=True, seed=a.seed, device=dev)
        calib_bare = syn.batches(100, device=dev)
        print(f"{a.synthetic} synthetic images ({a.synth_steps} steps): "
              f"{time.perf_counter() - t1:.0f} s", flush=True)
    n_calib = a.synthetic or len(cviews)
    base = measure(model, test, None)
    ref = base.pop("preds")
    rows = [{"method": "original", "target": 1.0, "macs": 1.0, **base, "seconds": 0.0}]
    print(f"original: top-1 {base['top1']:.1f} % on the {base['n']} held-out images "
          f"(load {time.perf_counter() - t0:.0f} s)", flush=True)
    total = count_macs(model, shape)
    overrides = {k: _value(v) for k, v in (kv.split("=") for kv in a.cap.split(",") if kv)}
    ft_epochs = max(1, math.ceil(a.steps * a.batch_size / n_calib))
    ft = {k: _value(v) for k, v in (kv.split("=") for kv in a.ft.split(",") if kv)}
    def write() -> None:  # after every row: a run stopped early keeps what it measured
        out = {**run_record(a.seed, device=str(dev), split=data.extra.get("split"),
                            steps=a.steps, batch_size=a.batch_size, finetune_epochs=ft_epochs,
                            calib_views=a.calib_views, calib_images=n_calib,
                            stream_projection=a.stream,
                            synthetic=synth),
               "rows": rows, "wall_s": time.perf_counter() - t0}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(out, indent=1), Path(a.out))

    def distil(net, method: str, t: float, alloc: str, secs: float, **extra) -> None:
        """The label-free distillation of `net` (in place), choosing on the held-out slice."""
        t1 = time.perf_counter()
        hist = caproj.finetune(net, unlabeled, epochs=a.distil_epochs, teacher=model,
                               holdout=held, progress=False, seed=a.seed, **ft)
        dsecs = time.perf_counter() - t1
        r = measure(net, test, ref)
        r.pop("preds")
        rows.append({"method": method, "stage": f"+{a.distil_epochs} label-free distillation "
                     "epochs", **extra, "finetune": ft, "holdout": a.holdout, "target": t,
                     "allocation": alloc, "macs": count_macs(net, shape) / total, **r,
                     "seconds": secs + dsecs, "distil_seconds": dsecs,
                     "train_images": a.distil_epochs * len(cx), "history": hist})
        print(f"{t:.2f} {alloc} {method} +{a.distil_epochs} distillation epochs: "
              f"{r['top1']:.1f} % (agree {r['agree']:.1f}) {secs + dsecs:.0f} s "
              f"(best epoch {hist[-1].get('holdout_best_epoch')})", flush=True)
        write()

    for t, alloc in [(float(v), al) for v in a.targets.split(",")
                     for al in a.allocations.split(",")]:
        plan = Plan.of(model, shape, target_macs=t, allocation=alloc,
                       stream_projection=a.stream)
        # caproj: calibration only, then label-free CaP steps (same job, staged)
        t1 = time.perf_counter()
        cap = caproj.CaP(model, torch.zeros(1, *shape, device=dev), plan=plan,
                         calib_images=n_calib, steps=a.steps, batch_size=a.batch_size,
                         progress=False, seed=a.seed, **overrides)
        cap.calibrate(calib_bare)
        widths = plan.widths
        small = cap.finalize()
        secs = time.perf_counter() - t1
        r = measure(small, test, ref)
        r.pop("preds")
        macs = count_macs(small, shape) / total
        rows.append({"method": "caproj", "stage": "calibration only", "target": t, "cap": overrides,
                     "allocation": alloc, "widths": widths,
                     "macs": macs, **r, "seconds": secs})
        print(f"{t:.2f} {alloc} caproj calib-only: {r['top1']:.1f} % (agree {r['agree']:.1f}) "
              f"macs {macs:.3f} {secs:.0f} s", flush=True)
        write()
        if a.distil_epochs and "caproj" in a.distil.split(","):
            distil(small, "caproj", t, alloc, secs, cap=overrides)
        if a.steps:
            t1 = time.perf_counter()
            cap.optimise(unlabeled)
            small = cap.finalize()
            secs += time.perf_counter() - t1
            r = measure(small, test, ref)
            r.pop("preds")
            rows.append({"method": "caproj", "stage": f"+{a.steps} label-free CaP steps",
                         "cap": overrides, "target": t, "allocation": alloc,
                         "macs": count_macs(small, shape) / total, **r,
                         "seconds": secs, "train_images": a.steps * a.batch_size})
            print(f"{t:.2f} {alloc} caproj +{a.steps} steps: {r['top1']:.1f} % "
                  f"(agree {r['agree']:.1f}) {secs:.0f} s", flush=True)
        write()
        if a.no_tp:
            continue
        # Torch-Pruning at the same widths
        t1 = time.perf_counter()
        tp = torch_pruning_l2(model, plan.sites, widths, shape)
        secs = time.perf_counter() - t1
        macs = count_macs(tp, shape) / total
        r = measure(tp, test, ref)
        r.pop("preds")
        rows.append({"method": "tp-l2", "stage": "as pruned", "target": t, "allocation": alloc,
                     "macs": macs, **r,
                     "seconds": secs})
        t1 = time.perf_counter()
        recalibrate_bn(tp, [x.to(dev) for x in calib_bare])
        secs += time.perf_counter() - t1
        r = measure(tp, test, ref)
        r.pop("preds")
        rows.append({"method": "tp-l2", "stage": "BN re-estimated", "target": t,
                     "allocation": alloc, "macs": macs,
                     **r, "seconds": secs})
        print(f"{t:.2f} {alloc} tp-l2: {rows[-2]['top1']:.1f} % / BN {r['top1']:.1f} % "
              f"(agree {r['agree']:.1f}) macs {macs:.3f}", flush=True)
        write()
        if a.distil_epochs and "tp-l2" in a.distil.split(","):  # the same recipe and choice
            distil(tp, "tp-l2", t, alloc, secs)
        if a.steps:
            t1 = time.perf_counter()
            caproj.finetune(tp, unlabeled, epochs=ft_epochs, teacher=model, progress=False,
                            seed=a.seed)
            secs += time.perf_counter() - t1
            r = measure(tp, test, ref)
            r.pop("preds")
            rows.append({"method": "tp-l2", "stage": f"+{ft_epochs} label-free KD epochs",
                         "target": t, "allocation": alloc, "macs": macs, **r, "seconds": secs,
                         "train_images": ft_epochs * n_calib})
            print(f"{t:.2f} {alloc} tp-l2 +KD: {r['top1']:.1f} % (agree {r['agree']:.1f}) "
                  f"{secs:.0f} s", flush=True)
        write()
    write()


if __name__ == "__main__":
    main()
