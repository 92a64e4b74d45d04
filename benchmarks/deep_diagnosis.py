"""Why do CaP's deep-compression starts fine-tune worse than pruned ones? (issue 17, item 2)

For each start at one MACs target (Torch-Pruning `tp-l2`, closed-form selection + least squares
`cp`, `cap`, and `cp` / `cap` with `match_scale`: the same networks, each layer that feeds a BN
rescaled to the original layer's weight size) it records, on ResNet-56 / JPEG CIFAR-10:

- sizes: per layer that feeds a BN, the RMS of its weights against the original layer's
  (site producers, whose BN CaP folds, and site consumers, which `cp`/`cap` refit), and the RMS
  of each fresh producer BN's weight (gamma) against the original's;
- a sharpness proxy: the training loss of one fixed batch before and after one SGD step at the
  fine-tune recipe's peak lr (BN in training mode), and the same for a second batch the step did
  not see;
- the first `--steps` steps of the fine-tune recipe (SGD nesterov one-cycle over 3 epochs, peak
  `--lr`, KD 0.5 from the original, the bench's recipe at 25 %): top-1 on a seeded 2,000 of the
  test images every `--eval-every` steps, and the training loss.

The rescaled starts are copies of the unscaled ones (same widths, same function), so every
difference between `cap` and `cap+rescale` is the weights' scale.

    python benchmarks/deep_diagnosis.py --arch resnet56 --target 0.25 \
        --out benchmarks/out/deep/diagnosis-resnet56-0.25.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj.config import FINETUNE  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.losses import kd_loss  # noqa: E402
from caproj.models import load_model  # noqa: E402
from caproj.sites import find_sites  # noqa: E402
from caproj.surgery import match_weight_scale  # noqa: E402
from caproj.train import make_optimizer, make_scheduler  # noqa: E402
from caproj.utils import atomic_write_bytes, run_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "cifar10-jpeg.tar.gz"


def _spread(v: list[float]) -> dict:
    return {"min": min(v), "median": statistics.median(v), "max": max(v)} if v else {}


def sizes(small, original, sites) -> dict:
    """Weight-size ratios (small / original) of the layers that feed a BN, by role."""
    ratios = match_weight_scale(copy.deepcopy(small), original)  # on a copy: ratios only
    prods = {p for s in sites for p, _ in s.producers}
    cons = {c for s in sites for c, _ in s.consumers}
    om, sm = dict(original.named_modules()), dict(small.named_modules())
    gam = []
    for s in sites:
        for _, bn in s.producers:
            if bn:
                g, g0 = sm[bn].weight.detach(), om[bn].weight.detach()
                gam.append(float(g.pow(2).mean().sqrt() / g0.pow(2).mean().sqrt()))
    return {"producers": _spread([r for k, r in ratios.items() if k in prods]),
            "consumers": _spread([r for k, r in ratios.items() if k in cons]),
            "producer_bn_gamma": _spread(gam), "per_layer": ratios}


def _loss(model, teacher, x, y, kd: float, t: float) -> torch.Tensor:
    out = model(x)
    loss = F.cross_entropy(out, y)
    if kd > 0:
        with torch.no_grad():
            tout = teacher(x)
        loss = (1 - kd) * loss + kd * kd_loss(out, tout, t)
    return loss


def sharpness(small, teacher, batches, cfg) -> dict:
    """Loss of batch 0 (stepped on) and batch 1 (held out) before and after one SGD step at
    the peak lr, BN in training mode."""
    m = copy.deepcopy(small).train()
    (x0, y0), (x1, y1) = batches
    with torch.no_grad():
        before = [_loss(m, teacher, x, y, cfg.kd_weight, cfg.kd_temperature).item()
                  for x, y in ((x0, y0), (x1, y1))]
    opt = make_optimizer(m, cfg)
    _loss(m, teacher, x0, y0, cfg.kd_weight, cfg.kd_temperature).backward()
    opt.step()
    with torch.no_grad():
        after = [_loss(m, teacher, x, y, cfg.kd_weight, cfg.kd_temperature).item()
                 for x, y in ((x0, y0), (x1, y1))]
    return {"loss_before": before[0], "loss_after": after[0], "held_out_before": before[1],
            "held_out_after": after[1]}


def trajectory(small, teacher, train, test, cfg, steps: int, every: int) -> list[dict]:
    """The first `steps` steps of the recipe `cfg` (its schedule spans cfg.epochs epochs)."""
    m = copy.deepcopy(small)
    opt = make_optimizer(m, cfg)
    sched = make_scheduler(opt, cfg, cfg.epochs * len(train))
    torch.manual_seed(cfg.seed)
    rows = [{"step": 0, "acc": caproj.evaluate(m, test, progress=False)["acc"]}]
    losses: list[float] = []
    step = 0
    m.train()
    for x, y in train:
        loss = _loss(m, teacher, x, y, cfg.kd_weight, cfg.kd_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        step += 1
        if step % every == 0:
            rows.append({"step": step, "acc": caproj.evaluate(m, test, progress=False)["acc"],
                         "train_loss": statistics.fmean(losses[-every:]),
                         "lr": sched.get_last_lr()[0]})
            m.train()
        if step >= steps:
            break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--methods", default="tp-l2,cp,cap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    data = load_data(str(DATA))
    train = Batches.train_of(data, 128, seed=a.seed)
    calib = Batches.subset_of(data, 2000, 250, seed=a.seed)
    # a seeded random 2,000 of the test split (its files are stored class by class)
    idx = torch.randperm(len(data.test_x), generator=torch.Generator().manual_seed(0))[:2000]
    test = Batches(data.test_x[idx], data.test_y[idx], 500, data.mean, data.std)
    model, _ = load_model(str(SHARED / "models" / f"{a.arch}-cifar10jpeg.th"), a.arch, 10)
    model.eval()
    sites = find_sites(model).sites
    cfg = FINETUNE.replace(lr=a.lr, epochs=3, seed=a.seed)
    it = iter(Batches.train_of(data, 128, seed=a.seed + 1))
    fixed = [next(it), next(it)]
    out = {"arch": a.arch, "target": a.target, "seed": a.seed, "recipe": cfg.as_dict(),
           "steps": a.steps, "command": "python " + " ".join(shlex.quote(v) for v in sys.argv),
           "starts": {}}
    for method in a.methods.split(","):
        t0 = time.perf_counter()
        res = caproj.compress(model, train, preset=None, target_macs=a.target, method=method,
                              calib_data=calib, seed=a.seed, progress=False)
        compress_s = time.perf_counter() - t0
        variants = {method: res.model}
        if method in ("cp", "cap"):
            scaled = copy.deepcopy(res.model)
            match_weight_scale(scaled, model)
            variants[f"{method}+rescale"] = scaled
        for name, small in variants.items():
            t1 = time.perf_counter()
            rec = {"compress_seconds": compress_s, "sizes": sizes(small, model, sites),
                   "sharpness": sharpness(small, model, fixed, cfg),
                   "trajectory": trajectory(small, model, train, test, cfg, a.steps,
                                            a.eval_every)}
            rec["seconds"] = time.perf_counter() - t1
            out["starts"][name] = rec
            tr = rec["trajectory"]
            logging.info("%s: acc %s; sharpness %s", name,
                         " ".join(f"{r['acc']:.1f}" for r in tr), rec["sharpness"])
    out.update(run_record(a.seed))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json.dumps(out, indent=1, default=str).encode(), Path(a.out))


if __name__ == "__main__":
    main()
