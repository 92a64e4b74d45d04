"""Probe (issue 35): after caproj's cascaded calibration of MobileNetV2, refit *every* conv of
each inverted-residual block in order (GPTQ's sequential calibration), not only the consumers
of narrowed sites. Each block's input is cached for both networks (O(depth) forwards); in
order, each of the block's convs gets the least-squares weight that maps the narrow network's
actual input to the original's output at the same place, read through the site's projection
and the narrow BN:
- the expansion (a site's producer: its input stream carries the error so far, which only the
  consumers' refits corrected before);
- optionally the depthwise conv (one 9-unknown system per kept channel);
- the projection, to the original's block output (the skip's difference absorbed, as
  `refit_target="block"` does);
then the last 1x1 conv (the 1,280 features) and the classifier (damped toward W P, as the
preset's `damping=1`). Same split, widths and evaluation as `mobilenet_imagenet.py`; widths
read from a JSON it wrote, so no allocation runs here.

    python benchmarks/mnv2_every_layer.py --target 0.5 --variants cascade,expand,expand+dw \
        --widths-from benchmarks/out/mnv2/calibration-preset.json \
        --out benchmarks/out/mnv2/every-layer-0.5.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mobilenet_imagenet import SHARED, measure  # noqa: E402

import caproj  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.plan import Plan  # noqa: E402
from caproj.refit import normal_equations, samples, solve  # noqa: E402
from caproj.utils import atomic_write_text, run_record, seed_everything  # noqa: E402


def affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) with bn(z) = a z + c per channel in eval mode."""
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    c = -bn.running_mean * a + (bn.bias if bn.bias is not None else 0.0)
    return a, c


def ch(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


@torch.no_grad()
def fit(mod: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor], ridge: float,
        anchor: torch.Tensor | None = None, damping: float = 0.0) -> None:
    """Least-squares weight of `mod` (no bias) mapping xs to ys; written in place."""
    g = c = None
    rows = 0
    for x, y in zip(xs, ys, strict=True):
        gi, ci = normal_equations(mod, x, y)
        g, c = (gi, ci) if g is None else (g + gi, c + ci)
        rows += samples(mod, y)
    aw = damping * g.shape[-1] / rows if anchor is not None else 0.0
    mod.weight.copy_(solve(g, c, mod.weight, ridge, anchor=anchor, anchor_weight=aw))


class Pair:
    """One block's modules in both networks, and the projections around it."""

    def __init__(self, bo: nn.Module, bs: nn.Module, p_mid: torch.Tensor | None,
                 p_out: torch.Tensor | None) -> None:
        self.bo, self.bs, self.p_mid, self.p_out = bo, bs, p_mid, p_out


def stage(seq: nn.Sequential, x: torch.Tensor, upto: int) -> torch.Tensor:
    for m in list(seq)[:upto]:
        x = m(x)
    return x


@torch.no_grad()
def refit_block(pair: Pair, xs: list[torch.Tensor], xo: list[torch.Tensor], dw: bool,
                ridge: float) -> None:
    """Refit the block's expansion, depthwise (if `dw`) and projection convs in order."""
    co, cs = pair.bo.conv, pair.bs.conv
    expand = len(co) == 4  # [expand CNA, dw CNA, project conv, BN] (t != 1) or [dw CNA, conv, BN]
    pm = pair.p_mid

    def narrow_target(bn_o, z_o, bn_s, p):  # narrow conv output: BN_s^-1(P^T BN_o(z_o))
        a_o, c_o = affine(bn_o)
        a_s, c_s = affine(bn_s)
        y = ch(a_o) * z_o + ch(c_o)
        if p is not None:
            y = torch.einsum("nchw,cd->ndhw", y, p)
        return (y - ch(c_s)) / ch(a_s)

    if expand:
        ys = [narrow_target(co[0][1], co[0][0](x), cs[0][1], pm) for x in xo]
        fit(cs[0][0], xs, ys, ridge)
    i = 1 if expand else 0
    hs = [stage(cs, x, i) for x in xs]
    ho = [stage(co, x, i) for x in xo]
    if dw:
        ys = [narrow_target(co[i][1], co[i][0](h), cs[i][1], pm) for h in ho]
        fit(cs[i][0], hs, ys, ridge)
    hs = [cs[i](h) for h in hs]
    ho = [co[i](h) for h in ho]
    a_s, c_s = affine(cs[i + 2])
    ys = []
    for h, xo_k, xs_k in zip(ho, xo, xs, strict=True):
        out = co[i + 2](co[i + 1](h))
        if pair.bo.use_res_connect:
            out = out + xo_k
        if pair.p_out is not None:
            out = torch.einsum("nchw,cd->ndhw", out, pair.p_out)
        if pair.bs.use_res_connect:
            out = out - xs_k
        ys.append((out - ch(c_s)) / ch(a_s))
    fit(cs[i + 1], hs, ys, ridge)


def site_of(sites, projections, *, producer: str | None = None, mid: str | None = None):
    for s, p in zip(sites, projections, strict=True):
        if producer is not None and any(pr == producer for pr, _ in s.producers):
            return p
        if mid is not None and mid in s.mids:
            return p
    return None


@torch.no_grad()
def every_layer(model: nn.Module, small: nn.Module, sites, projections, calib, dw: bool,
                ridge: float, damping: float) -> None:
    xo = [x for x in calib]
    xs = [x.clone() for x in calib]
    fo, fs = model.features, small.features
    xo = [fo[0](x) for x in xo]
    xs = [fs[0](x) for x in xs]
    for k in range(1, len(fo) - 1):
        dwname = f"features.{k}.conv.{1 if len(fo[k].conv) == 4 else 0}.0"
        pair = Pair(fo[k], fs[k], site_of(sites, projections, mid=dwname),
                    site_of(sites, projections, producer=f"features.{k}.conv."
                            f"{len(fo[k].conv) - 2}"))
        refit_block(pair, xs, xo, dw, ridge)
        xo = [fo[k](x) for x in xo]
        xs = [fs[k](x) for x in xs]
    last = len(fo) - 1  # features.18: conv 320 -> 1280, BN, ReLU6 (a site's producer)
    p = site_of(sites, projections, producer=f"features.{last}.0")
    a_o, c_o = affine(fo[last][1])
    a_s, c_s = affine(fs[last][1])
    ys = []
    for x in xo:
        y = ch(a_o) * fo[last][0](x) + ch(c_o)
        if p is not None:
            y = torch.einsum("nchw,cd->ndhw", y, p)
        ys.append((y - ch(c_s)) / ch(a_s))
    fit(fs[last][0], xs, ys, ridge)
    po = [F.adaptive_avg_pool2d(fo[last](x), 1).flatten(1) for x in xo]
    ps = [F.adaptive_avg_pool2d(fs[last](x), 1).flatten(1) for x in xs]
    cls_o, cls_s = model.classifier[1], small.classifier[1]
    targets = [cls_o(x) for x in po]
    anchor = cls_o.weight @ p if p is not None else cls_o.weight
    fit(cls_s, ps, targets, ridge, anchor=anchor, damping=damping)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(SHARED / "models" / "mobilenet_v2-imagenet-int8dq.pt"))
    ap.add_argument("--data", default=str(SHARED / "data" / "imagenet-sample-1000.tar.gz"))
    ap.add_argument("--widths-from", required=True)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--variants", default="cascade,expand,expand+dw")
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torchvision

    seed_everything(a.seed)
    t0 = time.perf_counter()
    data = load_data(a.data, 224, split=500)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(a.weights, weights_only=True))
    model.eval()
    rows_in = json.loads(Path(a.widths_from).read_text())["rows"]
    widths = next(r["widths"] for r in rows_in if r.get("widths") and r["target"] == a.target)
    calib = [x for x in Batches(data.train_x, None, a.chunk, data.mean, data.std)]
    calib100 = [x for x in Batches(data.train_x, None, 100, data.mean, data.std)]
    test = Batches(data.test_x, data.test_y, 100, data.mean, data.std)
    ref = measure(model, test, None).pop("preds")
    own_set = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib100]
    ref_own = measure(model, own_set, None).pop("preds")
    shape = (3, 224, 224)
    plan = Plan.of(model, shape, widths=widths)
    t1 = time.perf_counter()
    cap = caproj.CaP(model, torch.zeros(1, *shape), plan=plan, calib_images=500, steps=0,
                     refit_target="block", damping=a.damping, progress=False, seed=a.seed)
    cap.calibrate(calib100)
    base = cap.finalize().eval()
    cal_s = time.perf_counter() - t1
    projections = cap.projections()
    rows = []
    for v in a.variants.split(","):
        small = copy.deepcopy(base)
        t2 = time.perf_counter()
        if v != "cascade":
            every_layer(model, small, plan.sites, projections, calib, dw="dw" in v,
                        ridge=a.ridge, damping=a.damping)
        r = measure(small, test, ref)
        r.pop("preds")
        own = measure(small, own_set, ref_own)["agree"]
        rows.append({"variant": v, "target": a.target, "widths": widths, **r,
                     "agree_calibration_images": own,
                     "calibration_seconds": cal_s, "pass_seconds": time.perf_counter() - t2})
        print(f"{v}: top-1 {r['top1']:.1f} % (agree {r['agree']:.1f}; own {own:.1f}) "
              f"pass {time.perf_counter() - t2:.0f} s", flush=True)
        out = {**run_record(a.seed, ridge=a.ridge, damping=a.damping, widths_from=a.widths_from),
               "rows": rows, "wall_s": time.perf_counter() - t0}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(out, indent=1), Path(a.out))


if __name__ == "__main__":
    main()
