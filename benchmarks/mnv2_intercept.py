"""Experiment (issue 35): MobileNetV2's cascaded least-squares refit with an intercept: each
conv consumer's output mean is fitted too (unpenalised), and the bias moves into the BN that
follows the consumer (the checkpoint's BNs are identity, so their running mean carries it).
Calibration only, 500 unlabeled images, uniform widths; top-1 on the held-out 500.

    python benchmarks/mnv2_intercept.py --target 0.7 --out benchmarks/out/mnv2/intercept-0.7.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj import refit, surgery  # noqa: E402
from caproj.batches import WithoutLabels  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.plan import Plan  # noqa: E402
from caproj.utils import atomic_write_text, run_record  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAPE = (3, 224, 224)


@torch.no_grad()
def predict(model: nn.Module, test) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-1 predictions, labels, logits) over the test batches."""
    out = [(model(x), y) for x, y in test]
    logits = torch.cat([o for o, _ in out])
    return logits.argmax(1), torch.cat([y for _, y in out]), logits


def bn_after(model: nn.Module, name: str) -> str | None:
    """The BatchNorm registered right after `name` (torchvision's conv, BN pairs)."""
    names = [n for n, _ in model.named_modules()]
    i = names.index(name)
    nxt = names[i + 1] if i + 1 < len(names) else None
    return nxt if nxt and isinstance(model.get_submodule(nxt), nn.BatchNorm2d) else None


def system(m: nn.Module, xin: torch.Tensor, y: torch.Tensor, intercept: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(X^T X, X^T Y) of a groups-1 conv over unfolded patches, with a column of ones."""
    cols = F.unfold(xin.float(), m.kernel_size, m.dilation, m.padding, m.stride)
    if intercept:
        cols = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)
    yy = y.float().reshape(y.shape[0], y.shape[1], -1)
    return (torch.einsum("nkl,njl->kj", cols, cols).double(),
            torch.einsum("nkl,nol->ko", cols, yy).double())


@torch.no_grad()
def refit_with_intercept(cap: caproj.CaP, model: nn.Module) -> int:
    """The cascade of `caproj.refit`, each conv consumer solved with an intercept."""
    mods = dict(model.named_modules())
    names = {c for s, k in zip(cap.sites, cap.widths, strict=True) if k < s.channels
             for c, _ in s.consumers}
    walk_n, walk_o = refit.Walk(cap.narrow), refit.Walk(model)
    cursors = [(refit.Cursor(x), refit.Cursor(x)) for x in cap.calib]
    surgery.load_tensors(cap.narrow, cap.tensors())
    moved, sizes = 0, []
    for name in walk_o.call_order(names):
        m = mods[name]
        conv = isinstance(m, nn.Conv2d) and m.groups == 1
        bn = bn_after(model, name) if conv and m.bias is None else None
        gram = cross = None
        for cn, co in cursors:
            xin, y = walk_n.input_of(cn, name), walk_o.output_of(co, name)
            g, c = system(m, xin, y, bn is not None) if conv else \
                refit.normal_equations(m, xin, y)
            gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        if not conv:  # the Linear classifier: as caproj does it
            cap.consumer_w[name] = refit.solve(gram[None] if gram.dim() == 2 else gram,
                                               cross, m.weight, cap.cfg.ridge)
        else:
            reg = cap.cfg.ridge * torch.diagonal(gram).mean() * torch.eye(
                gram.shape[0], dtype=gram.dtype)
            if bn is not None:
                reg[-1, -1] = 0  # the intercept is not pulled toward zero
            sol = torch.linalg.solve(gram + reg, cross)
            if bn is not None:
                key = f"{bn}.running_mean"
                cap.base[key] = (cap.base[key] - sol[-1].float()).clone()
                # the bias against the output's size: sqrt(mean square of Y) per channel
                sizes.append(float(sol[-1].norm() / (torch.diagonal(
                    cross[:-1].T @ torch.linalg.pinv(gram[:-1, :-1]) @ cross[:-1]).sum()
                    / gram[-1, -1]).sqrt()))
                sol, moved = sol[:-1], moved + 1
            cap.consumer_w[name] = sol.T.float().reshape(
                m.weight.shape[0], -1, *m.weight.shape[2:]).contiguous()
        surgery.load_tensors(cap.narrow, cap.tensors())
    log_sizes = sorted(sizes)
    print("intercept / output RMS per consumer:", [round(v, 4) for v in log_sizes], flush=True)
    return moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_data(str(SHARED / "data" / "imagenet-sample-1000.tar.gz"), 224, split=500)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(SHARED / "models" / "mobilenet_v2-imagenet-int8dq.pt",
                                     weights_only=True))
    model.eval()
    calib = WithoutLabels(Batches(data.train_x, data.train_y, 100, data.mean, data.std))
    test = Batches(data.test_x, data.test_y, 100, data.mean, data.std)
    t0 = time.perf_counter()
    rows, preds = {}, []
    for intercept in (False, True):
        cap = caproj.CaP(model, torch.zeros(1, *SHAPE), calib_images=500, steps=0, seed=0,
                         plan=Plan.of(model, SHAPE, target_macs=a.target), progress=False,
                         refit=not intercept)
        cap.calibrate(calib)
        moved = refit_with_intercept(cap, model) if intercept else 0
        p, y, logits = predict(cap.finalize(), test)
        preds.append((p, logits))
        rows["with intercept" if intercept else "caproj's refit"] = {
            "top1": 100.0 * float((p == y).float().mean()), "biases_moved": moved}
        print(a.target, rows, flush=True)
    rows["same prediction, %"] = 100.0 * float((preds[0][0] == preds[1][0]).float().mean())
    rows["largest logit difference"] = float((preds[0][1] - preds[1][1]).abs().max())
    print(rows, flush=True)
    out = {"target_macs": a.target, "rows": rows, "seconds": time.perf_counter() - t0,
           **run_record(0)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=1, default=str), a.out)


if __name__ == "__main__":
    main()
