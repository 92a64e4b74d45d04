"""Compress ResNet-56 to a measured latency, and Torch-Pruning to the same latency, same recipe.

`run`: caproj.compress(target_latency=T, runtime, latency_batch, latency_threads,
allocation=auto) with CaP and the default fine-tune recipe (`caproj.FINETUNE`, 3 epochs), then
Torch-Pruning (`tp-l2`) given the same widths (the same architecture, hence the same latency,
checked by measurement) and the same fine-tuning. Checkpoints go next to the JSON (*.pt, not
committed). `measure`: original, CaP and Torch-Pruning measured interleaved in the runtime,
`--repeats` runs (run it on a quiet machine; `run` measures too, while it may share the cores).

    python benchmarks/latency_budget.py run --runtime onnxruntime --batch 1 --threads 1 \
        --out benchmarks/out/latency/r56-ort-b1.json
    python benchmarks/latency_budget.py measure --out benchmarks/out/latency/r56-ort-b1.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import caproj  # noqa: E402
from caproj import latency as L  # noqa: E402
from caproj.config import CHANNEL_MULTIPLE  # noqa: E402
from caproj.data import Batches, load_data  # noqa: E402
from caproj.models import load_model  # noqa: E402
from caproj.sites import require_sites  # noqa: E402
from caproj.utils import atomic_write_bytes, run_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "models" / "resnet56-cifar10jpeg.th"
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _write(path: Path, rec: dict) -> None:
    atomic_write_bytes(json.dumps(rec, indent=1, default=str).encode(), path)


def _cell(res: caproj.Result) -> dict:
    r = res.report
    return {"widths": res.widths, "macs_after": r["macs_after"], "macs_before": r["macs_before"],
            "acc_before": r.get("acc_before"), "acc_before_ft": r.get("acc_after_compress"),
            "acc_after_ft": r.get("acc_after_finetune"),
            "finetune": [{k: e.get(k) for k in ("epoch", "test_acc", "train_loss", "seconds")}
                         for e in r.get("finetune", [])],
            "compress_seconds": r.get("compress_seconds"),
            "finetune_seconds": r.get("finetune_seconds"),
            "latency": r.get("latency"), "latency_model": r.get("latency_model"),
            "latency_checks": r.get("latency_checks"), "latency_notes": r.get("latency_notes")}


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = json.loads(out.read_text()) if out.exists() else {}
    torch.set_num_threads(a.train_threads)
    data = load_data(str(DATA))
    model, _ = load_model(str(WEIGHTS), "resnet56", 10, 3)
    model.eval()
    train = Batches.train_of(data, 128, seed=a.seed)
    calib = Batches.subset_of(data, 2000, 250, seed=a.seed)
    test = Batches.test_of(data, 500)
    command = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    commands = rec.get("commands", [rec["command"]] if "command" in rec else [])
    rec.update({**run_record(a.seed), "torch_threads": a.train_threads,
                "commands": [*commands, command],  # every run that added to this file
                "arch": "resnet56", "weights": str(WEIGHTS.name), "runtime": a.runtime,
                "batch": a.batch, "threads": a.threads, "target_latency": a.target,
                "seed": a.seed, "finetune_epochs": a.epochs, "command": command,
                "machine": L.machine()})  # threads: the latency's (run_record's: torch's)
    if "cap" not in rec:
        t0 = time.perf_counter()
        res = caproj.compress(model, train, preset=None, target_latency=a.target, runtime=a.runtime,
                              latency_batch=a.batch, latency_threads=a.threads,
                              allocation=a.allocation, stream_projection=a.stream,
                              match_scale=a.rescale, calib_data=calib, eval_data=test,
                              finetune=a.epochs, seed=a.seed, progress=False)
        rec["cap"] = {**_cell(res), "seconds": time.perf_counter() - t0,
                      "allocation": a.allocation, "stream_projection": a.stream,
                      "match_scale": a.rescale}
        caproj.save(res.model, out.with_suffix(".cap.pt"), arch="resnet56", num_classes=10,
                    input_shape=[3, 32, 32])
        _write(out, rec)
        print(f"cap: widths {res.widths}, {rec['cap']['acc_before_ft']:.2f} -> "
              f"{rec['cap']['acc_after_ft']:.2f} %", flush=True)
    if "tp" not in rec and a.tp_from:
        src = Path(a.tp_from)
        rec["tp"] = {**json.loads(src.read_text())["tp"], "copied_from": src.name}
        atomic_write_bytes(src.with_suffix(".tp.pt").read_bytes(), out.with_suffix(".tp.pt"))
        _write(out, rec)
    if "tp" not in rec and not a.no_tp:
        t0 = time.perf_counter()
        widths, stream = rec["cap"]["widths"], a.stream
        if a.tp_inner:  # Torch-Pruning cannot prune ResNet-56's streams (option-A shortcuts:
            # its graph couples a zero-padded 12-channel stream with a 32-channel one): the
            # inner sites only, at the narrowest widths on the latency grid, its fastest form
            widths = [g[0] for _, g in L.site_grids(require_sites(model), CHANNEL_MULTIPLE)]
            stream = False
        res = caproj.compress(model, train, preset=None, method="tp-l2", widths=widths,
                              stream_projection=stream,
                              calib_data=calib, eval_data=test, finetune=a.epochs,
                              seed=a.seed, progress=False)
        rec["tp"] = {**_cell(res), "seconds": time.perf_counter() - t0,
                     "inner_only": a.tp_inner}
        caproj.save(res.model, out.with_suffix(".tp.pt"), arch="resnet56", num_classes=10,
                    input_shape=[3, 32, 32])
        _write(out, rec)
        print(f"tp-l2: {rec['tp']['acc_before_ft']:.2f} -> {rec['tp']['acc_after_ft']:.2f} %",
              flush=True)


def measure(a: argparse.Namespace) -> None:
    out = Path(a.out)
    rec = json.loads(out.read_text())
    spec = L.Spec(rec["runtime"], rec["batch"], rec["threads"])
    model, _ = load_model(str(WEIGHTS), "resnet56", 10, 3)
    models = {"original": model.eval()}
    for m in ("cap", "tp"):
        p = out.with_suffix(f".{m}.pt")
        if p.exists():
            models[m] = caproj.load(p)
    r = L.compare(models, (3, 32, 32), spec, a.repeats)
    rec["measured"] = {"repeats": a.repeats, "models": r, "quiet": not a.shared,
                       "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    _write(out, rec)
    for n, v in r.items():
        print(f"{n:9s} {v['median_ms']:8.3f} ms  speed-up {v['speedup']:.2f}x "
              f"(repeats {', '.join(f'{s:.2f}' for s in v['repeats_speedup'])})")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("torch").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--runtime", default="onnxruntime", choices=L.RUNTIMES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="latency threads")
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--allocation", default="auto", choices=("uniform", "auto"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tp", action="store_true")
    p.add_argument("--stream", action="store_true",
                   help="residual-stream projection too (where widths alone cannot reach)")
    p.add_argument("--rescale", action="store_true",
                   help="CaP with match_scale (the deep-target recipe, README)")
    p.add_argument("--tp-from", help="take Torch-Pruning's record and checkpoint from this "
                   "JSON (the same network and recipe, already fine-tuned) instead of running it")
    p.add_argument("--tp-inner", action="store_true",
                   help="Torch-Pruning on the inner sites only, at the narrowest grid widths")
    p.add_argument("--out", required=True)
    p = sub.add_parser("measure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shared", action="store_true", help="record that the cores were shared")
    p.add_argument("--out", required=True)
    a = ap.parse_args()
    (run if a.cmd == "run" else measure)(a)


if __name__ == "__main__":
    main()
