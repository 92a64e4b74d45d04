"""Label-free and data-free compression of the CIFAR ResNets, through the library API.

Every cell compresses the shared JPEG-CIFAR-10 checkpoint to a MACs target with CaP's default
settings (600 steps of batch 128, 2,000 calibration images or all there are) and reports top-1
on the 10,000 test images *before any labelled fine-tuning*. Cells (`--cells`, comma-separated):

- `labelled:N`: today's CaP with labels (cross-entropy + distillation + reconstruction) on N
  training images (`labelled:50000`: the whole split, as `caproj compress` runs it).
- `unlabeled:N`: N training images (a seeded subset), labels never given to caproj; CaP's steps
  re-use them with random crops and flips (distillation from the original + reconstruction).
  `unlabeled:50000` is the whole training split without its labels.
- `synthetic:N`: N images synthesised from the model's BatchNorm statistics
  (`caproj.synthesize`, `--synth-steps` Adam steps per batch of 256), then as above. The set is
  kept in caproj's cache (`caproj.synthesize(cache=True)`, keyed by the weights, settings and
  N) and shared by every target; an interrupted synthesis resumes from
  `synthetic-<arch>-<N>.synth-state.pt` beside the JSON.
- `tp:N`: Torch-Pruning (`tp-l2`) at CaP's widths for the same target, then a distillation-only
  fine-tune on the same N unlabeled images for the same number of images CaP's steps consumed
  (600 x 128), SGD one-cycle at caproj's fine-tune lr.

A cell may carry CaP options after its size, `unlabeled:1000:lr=1e-3:weight_lr=3e-4` (the
rates before the small-set rule) or `unlabeled:1000:relax=projection`; they are recorded.
Two options belong to the benchmark: `kd_steps=K` follows CaP with a distillation-only fine-tune
of K steps on the same images (as the `tp` cell does; `kd_lr=` its peak lr, caproj's fine-tune
lr by default), so `unlabeled:1000:steps=300:kd_steps=300` spends the same 600 x 128 images as
the default cell and as `tp:1000`. `train_images` counts CaP's and distillation's images.
`match_scale=1` is the library's option (`caproj.compress(..., match_scale=True)`): every layer
feeding a BN is rescaled to the original layer's weight size after compression, the eval
function unchanged. `norm_match=1`, the session-11 spelling, applies the same
`caproj.surgery.match_weight_scale` from the benchmark (its session-11 cells ran an earlier
copy that left the BN weight's eps term alone).

One JSON per cell in `--out-dir` (`<arch>-<target>-<cell>[-seed<S>].json`, skipped when
present, so a run resumes cell by cell); `summary` prints the table.

    python benchmarks/label_free.py run --arch resnet56 --targets 0.5 \
        --cells unlabeled:1000,tp:1000,synthetic:5000 --out-dir benchmarks/out/label-free
    python benchmarks/label_free.py summary --out-dir benchmarks/out/label-free
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj.config import CAP, FINETUNE  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.models import load_model  # noqa: E402
from caproj.surgery import match_weight_scale  # noqa: E402
from caproj.synth import bn_statistics_loss  # noqa: E402
from caproj.utils import atomic_write_bytes, run_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "cifar10-jpeg.tar.gz"


def _weights(arch: str) -> Path:
    return SHARED / "models" / f"{arch}-cifar10jpeg.th"


def _write(path: Path, rec: dict) -> None:
    atomic_write_bytes(json.dumps(rec, indent=1, default=str).encode(), path)


def _subset(data, n: int, seed: int, labels: bool = False) -> tuple[Batches, Batches]:
    """n training images (without their labels unless `labels`): augmented batches for the
    steps, plain ones for calibration."""
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = data.train_x[idx], data.train_y[idx] if labels else None
    train = Batches(x, y, CAP.batch_size, data.mean, data.std, train=True,
                    crop_padding=data.crop_padding, flip=data.flip, seed=seed, drop_last=True)
    calib = Batches(x, y, 250, data.mean, data.std)
    return train, calib


def run(a: argparse.Namespace) -> None:
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    data = load_data(str(DATA))
    test = Batches.test_of(data, 500)
    model, _ = load_model(str(_weights(a.arch)), a.arch, 10)
    acc0 = caproj.evaluate(model, test, progress=False)["acc"]
    command = "python " + " ".join(shlex.quote(v) for v in sys.argv)
    for target in a.targets:
        for cell in a.cells:
            kind, n, *extra = cell.split(":")
            n = int(n)
            opts = {k: _value(v) for k, v in (o.split("=", 1) for o in extra)}
            tag = "".join(f"-{k}={v}" for k, v in opts.items()) + (
                f"-seed{a.seed}" if a.seed else "")
            f = out_dir / f"{a.arch}-{target:g}-{kind}-{n}{tag}.json"
            if f.exists():
                logging.info("%s exists: skipped", f)
                continue
            t0 = time.perf_counter()
            rec = {"arch": a.arch, "target": target, "cell": kind, "n_images": n, "seed": a.seed,
                   "options": dict(opts), "acc_original": acc0, "command": command}
            norm_match = bool(opts.pop("norm_match", 0))
            kd_steps = int(opts.pop("kd_steps", 0))
            kd_lr = float(opts.pop("kd_lr", FINETUNE.lr))
            cap_steps = int(opts.get("steps", CAP.steps))
            if kind in ("unlabeled", "labelled"):
                train, calib = _subset(data, n, a.seed, labels=kind == "labelled")
                res = caproj.compress(model, train, preset=None,
                                      calib_data=calib, target_macs=target,
                                      eval_data=test, seed=a.seed, progress=False, **opts)
            elif kind == "synthetic":
                syn = caproj.synthesize(model, n, (3, 32, 32), steps=a.synth_steps,
                                        seed=a.seed, progress=False, cache=True,
                                        state_path=str(out_dir / f"synthetic-{a.arch}-{n}"),
                                        resume=True)
                rec["synthesis"] = {k: v for k, v in syn.report.items() if k != "batches"}
                rec["synthesis"]["bn_loss_real"] = bn_statistics_loss(
                    model, torch.cat([x for x, _ in Batches.subset_of(data, n, 250, seed=a.seed)]))
                rec["synthesis"]["bn_loss_synthetic"] = bn_statistics_loss(model, syn.images)
                train = syn.batches(CAP.batch_size, train=True, seed=a.seed)
                res = caproj.compress(model, train, preset=None, calib_data=syn.batches(250),
                                      target_macs=target,
                                      eval_data=test, seed=a.seed, progress=False, **opts)
            elif kind == "tp":
                refs = sorted(out_dir.glob(f"{a.arch}-{target:g}-unlabeled-{n}*.json"))
                if not refs:
                    raise SystemExit(f"tp:{n} reuses the widths of unlabeled:{n}: run that first")
                widths = json.loads(refs[0].read_text())["widths"]
                train, calib = _subset(data, n, a.seed)
                res = caproj.compress(model, train, preset=None, calib_data=calib, widths=widths,
                                      method="tp-l2", eval_data=test, seed=a.seed,
                                      progress=False)
                rec["acc_pruned"] = res.report["acc_after_compress"]
                kd_steps = kd_steps or CAP.steps  # CaP's images: steps x batch
            else:
                raise SystemExit(f"unknown cell {cell!r}")
            if norm_match:
                rec["norm_match"] = match_weight_scale(res.model, model)
                rec["acc_after_norm_match"] = caproj.evaluate(res.model, test,
                                                              progress=False)["acc"]
            if kd_steps:
                if kind != "tp":  # tp recorded its as-pruned accuracy above
                    rec["acc_after_cap"] = res.report["acc_after_compress"]
                rec["kd_finetune"] = _kd(res.model, model, train, kd_steps, kd_lr, a.seed)
                res.report["acc_after_compress"] = caproj.evaluate(res.model, test,
                                                                   progress=False)["acc"]
            r = res.report
            if "cap_config" in r:
                rec["cap_config"] = r["cap_config"]
            if "match_scale" in r:  # the library's rescale (match_scale=1): ratios before it
                rec["match_scale"] = r["match_scale"]
            rec.update(widths=res.widths, macs_before=r["macs_before"], macs_after=r["macs_after"],
                       label_free=r["label_free"], acc_before_ft=r["acc_after_compress"],
                       train_images=((cap_steps if kind != "tp" else 0) + kd_steps)
                       * CAP.batch_size, compress_seconds=r.get(
                           "compress_seconds"), seconds=time.perf_counter() - t0,
                       **{**run_record(a.seed), "threads": a.threads})
            _write(f, rec)
            logging.info("%s %g %s: %.2f %% (%.0f s)", a.arch, target, cell, rec["acc_before_ft"],
                         rec["seconds"])


def _kd(student, teacher, train, steps: int, lr: float, seed: int) -> dict:
    """Distillation-only fine-tune of `student` on the same (unlabeled) batches for `steps`
    steps, SGD one-cycle peak `lr`: the label-free recovery every cell may spend images on."""
    epochs = math.ceil(steps / len(train))
    hist = caproj.finetune(student, train, epochs=epochs, teacher=teacher, kd_weight=1.0, lr=lr,
                           max_steps=steps, seed=seed, eval_data=None, progress=False)
    return {"steps": steps, "images": steps * CAP.batch_size, "epochs": epochs, "lr": lr,
            "loss_last": hist[-1].get("train_loss") if hist else None}


def _value(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def summary(a: argparse.Namespace) -> None:
    rows = [json.loads(f.read_text()) for f in sorted(Path(a.out_dir).glob("*.json"))]
    rows = [r for r in rows if "cell" in r]  # other benchmarks' JSON may share the folder
    print("| arch | MACs | data | images | options | seed | CaP lr / weight lr | before KD | "
          "top-1 before labelled FT | s |")
    print("|---|---:|---|---:|---|---:|---|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["arch"], -r["target"], r["cell"], r["n_images"],
                                         r["seed"])):
        c = r.get("cap_config") or {}
        rates = f"{c['lr']:.2g} / {c['weight_lr']:.2g}" if c.get("lr") else "–"
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) or "–"
        pre = r.get("acc_after_cap", r.get("acc_pruned"))
        pre = f"{pre:.2f}" if pre is not None else "–"
        print(f"| {r['arch']} | {r['macs_after'] / r['macs_before']:.3f} | {r['cell']} | "
              f"{r['n_images']} | {opts} | {r['seed']} | {rates} | {pre} | "
              f"{r['acc_before_ft']:.2f} | {r['seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--targets", type=lambda s: [float(v) for v in s.split(",")], default=[0.5])
    p.add_argument("--cells", type=lambda s: s.split(","), required=True)
    p.add_argument("--synth-steps", type=int, default=caproj.SYNTH.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out-dir", required=True)
    p = sub.add_parser("summary")
    p.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(a) if a.cmd == "run" else summary(a)


if __name__ == "__main__":
    main()
