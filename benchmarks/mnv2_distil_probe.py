"""Issue 35 probe: few-shot distillation of a calibrated MobileNetV2 (a checkpoint written by
benchmarks/mnv2_refit_sweep.py), MiR-style: the student's classifier applied before pooling
(a logit per position) matched to the teacher's by MSE (`--loss map`), or KL on the pooled
logits (`--loss kl`); random-resized crops and flips, optional mixup; Adam, cosine. The
held-out calibration images (the sweep's seeded slice) choose the best step, never the
evaluation half (its top-1 is printed for the record only).

    python benchmarks/mnv2_distil_probe.py --ckpt /tmp/c50-h50-d1.pt --mixup 1 --lr 1e-4 \\
        --steps 300 --out benchmarks/out/mnv2/kd-probe/h50-map-adam1e-4-mix1.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj.data import load_data  # noqa: E402
from caproj.utils import seed_everything, steady_allocator  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def logit_map(m, x):
    """The classifier applied at every position of the last feature map (before pooling)."""
    lin = m.classifier[1]
    return torch.einsum("bchw,kc->bkhw", m.features(x), lin.weight) + lin.bias.view(1, -1, 1, 1)


def crop(img, res, scale, g):
    """One random-resized crop (area `scale`..1, aspect 3/4..4/3) and flip, at res x res."""
    H, W = img.shape[-2:]
    w, h = W, H
    for _ in range(10):
        s = torch.empty(1).uniform_(scale, 1.0, generator=g).item() * H * W
        r = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g).item())
        w, h = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))
        if 0 < w <= W and 0 < h <= H:
            break
        w, h = W, H
    i = torch.randint(0, H - h + 1, (1,), generator=g).item()
    j = torch.randint(0, W - w + 1, (1,), generator=g).item()
    c = img[:, i:i + h, j:j + w].float().unsqueeze(0)
    c = F.interpolate(c, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return c.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--loss", default="map", choices=("map", "kl"))
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--hold", type=int, default=50)
    ap.add_argument("--mixup", type=float, default=0.0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    seed_everything(0)
    steady_allocator()
    data = load_data(str(SHARED / "data" / "imagenet-sample-1000.tar.gz"), 224, split=500)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    norm = lambda x: (x.float() - mean) / std
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(500, generator=g)  # the sweep's held-out slice
    tr_x, ho_x = data.train_x[perm[a.hold:]], data.train_x[perm[:a.hold]]
    teacher = torchvision.models.mobilenet_v2()
    teacher.load_state_dict(torch.load(SHARED / "models" / "mobilenet_v2-imagenet-int8dq.pt",
                                       weights_only=True))
    teacher.eval().requires_grad_(False)
    student = caproj.load(a.ckpt, model=torchvision.models.mobilenet_v2()).eval()

    @torch.no_grad()
    def logits_of(m, xs):
        return torch.cat([m(norm(xs[i:i + 100])) for i in range(0, len(xs), 100)])

    t_ho, t_te = logits_of(teacher, ho_x), logits_of(teacher, data.test_x)

    def score(m):
        s_ho, s_te = logits_of(m, ho_x), logits_of(m, data.test_x)
        kl = F.kl_div(s_ho.log_softmax(1), t_ho.log_softmax(1), log_target=True,
                      reduction="batchmean").item()
        pct = lambda b: 100 * b.float().mean().item()
        return {"ho_kl": kl, "ho_agree": pct(s_ho.argmax(1) == t_ho.argmax(1)),
                "top1": pct(s_te.argmax(1) == data.test_y),
                "agree": pct(s_te.argmax(1) == t_te.argmax(1))}

    opt = torch.optim.Adam(student.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / a.steps)))
    hist = [{"step": 0, **score(student), "s": 0.0}]
    print(hist[-1], flush=True)
    best = (hist[-1]["ho_kl"], 0, {k: v.clone() for k, v in student.state_dict().items()})
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(tr_x), (a.bs,), generator=g)
        x = norm(torch.cat([crop(img, a.res, a.scale, g) for img in tr_x[idx]]))
        if a.mixup > 0:
            lam = torch.distributions.Beta(a.mixup, a.mixup).sample((a.bs, 1, 1, 1))
            x = lam * x + (1 - lam) * x.flip(0)
        with torch.no_grad():
            tm = logit_map(teacher, x)
        sm = logit_map(student, x)  # BN stays in eval mode: its folded statistics are kept
        if a.loss == "map":
            loss = F.mse_loss(sm, tm)
        else:
            loss = F.kl_div(sm.mean((2, 3)).log_softmax(1), tm.mean((2, 3)).log_softmax(1),
                            log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % a.every == 0 or step == a.steps:
            sc = score(student)
            hist.append({"step": step, "loss": loss.item(), **sc, "s": time.perf_counter() - t0})
            print(hist[-1], flush=True)
            if sc["ho_kl"] < best[0]:
                best = (sc["ho_kl"], step, {k: v.clone() for k, v in student.state_dict().items()})
            Path(a.out).write_text(json.dumps({"args": vars(a), "hist": hist,
                                               "best_step": best[1]}, indent=1))
    student.load_state_dict(best[2])
    Path(a.out).write_text(json.dumps({"args": vars(a), "hist": hist, "best_step": best[1],
                                       "final": score(student),
                                       "wall_s": time.perf_counter() - t0}, indent=1))
    print("best step", best[1])


if __name__ == "__main__":
    main()
