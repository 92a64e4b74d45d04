"""Side-by-side benchmark: one model x methods x MACs targets, the same fine-tune budget each.

Each (method, target) cell records accuracy before and after fine-tuning, MACs, params, CPU
latency at batch 1 and 64 (interleaved with the original in the same run), peak activation
memory and compression wall time, in its own JSON file (with seed, versions, command). A
finished cell is never recomputed, so an interrupted run resumes where it stopped. `report`
turns the cells into a Markdown table and a matplotlib plot of accuracy against MACs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caproj import metrics
from caproj.budget import MacModel, widths_for_macs
from caproj.cap import CapConfig
from caproj.data import Data
from caproj.errors import CaprojError
from caproj.methods import check_methods, run_method
from caproj.sites import require_sites
from caproj.train import TrainConfig, config_dict, evaluate, train
from caproj.utils import atomic_write_text, run_record


def cell_path(out_dir: Path, method: str, target: float) -> Path:
    return out_dir / f"{method}-{target:g}.json"


def run_cell(model: nn.Module, splits: Data, method: str, target: float, ft: TrainConfig,
             cap_cfg: CapConfig, base_acc: float, log=print,
             channel_multiple: int = 8) -> dict[str, Any]:
    shape = splits.input_shape
    base, *flags = method.split("+")  # cap+stream+auto: CaP on streams too, auto widths
    sites = require_sites(model, stream="stream" in flags)
    mm = MacModel.of(model, shape)
    torch.manual_seed(ft.seed)
    t0 = time.perf_counter()
    if "auto" in flags:
        from caproj.allocate import auto_widths

        widths = auto_widths(model, sites, mm, splits, target, channel_multiple,
                             cap_cfg.calib_images, cap_cfg.seed)
    else:
        widths = widths_for_macs(mm, sites, target, channel_multiple)
    small = run_method(base, model, sites, widths, splits, mm, target, cap_cfg,
                       log=lambda s: None)
    seconds = time.perf_counter() - t0
    rec: dict[str, Any] = {
        "method": method, "target_macs": target, "widths": widths if method != "svd" else None,
        "compress_seconds": seconds, "acc_original": base_acc,
        "macs_original": mm.total, "macs": metrics.count_macs(small, shape),
        "params_original": metrics.count_params(model), "params": metrics.count_params(small),
        "acc_before_finetune": evaluate(small, splits)["acc"],
    }
    log(f"  {method} @ {target:g}: {rec['acc_before_finetune']:.2f} % before fine-tuning "
        f"({seconds:.0f} s)")
    t1 = time.perf_counter()
    teacher = model if ft.kd_weight > 0 else None  # distil from the original, as compress does
    hist = train(small, splits, ft, teacher=teacher, log=lambda s: None) if ft.epochs else []
    rec["finetune_seconds"] = time.perf_counter() - t1
    rec["finetune_history"] = hist
    rec["acc_after_finetune"] = hist[-1]["test_acc"] if hist else rec["acc_before_finetune"]
    small.eval()
    from caproj.pipeline import latency_report

    lat = latency_report(model, small, shape, None)  # eager, BN folded + cl, onnxruntime
    rec.update(lat)
    for b in (1, 64):  # the headline: one fixed deploy form for every method
        rec[f"latency_b{b}_ms"] = lat[f"latency_fold_bn_cl_b{b}_after_ms"]
        rec[f"latency_b{b}_original_ms"] = lat[f"latency_fold_bn_cl_b{b}_before_ms"]
        rec[f"latency_b{b}_speedup"] = lat[f"latency_fold_bn_cl_b{b}_speedup"]
    rec["peak_activation_bytes"] = metrics.peak_activation_bytes(small, shape)
    rec["peak_activation_bytes_original"] = metrics.peak_activation_bytes(model, shape)
    log(f"  {method} @ {target:g}: {rec['acc_after_finetune']:.2f} % after {ft.epochs} "
        f"fine-tune epochs; b1 {rec['latency_b1_speedup']:.2f}x, "
        f"b64 {rec['latency_b64_speedup']:.2f}x")
    return rec


def run(model: nn.Module, splits: Data, arch: str, methods: list[str], targets: list[float],
        ft: TrainConfig, cap_cfg: CapConfig, out_dir: Path, log=print,
        channel_multiple: int = 8) -> list[dict]:
    check_methods(methods)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_acc = evaluate(model, splits)["acc"]
    log(f"{arch}: {base_acc:.2f} % original")
    cells = []
    for target in targets:
        for method in methods:
            path = cell_path(out_dir, method, target)
            if path.is_file():
                done = json.loads(path.read_text())
                stored = done.get("finetune_config")  # keys added later: their defaults
                if stored is None or {**config_dict(TrainConfig()), **stored} != config_dict(ft):
                    raise CaprojError(f"{path} was fine-tuned with another recipe "
                                      f"({done.get('finetune_config')}); use a new --out-dir")
                cells.append(done)
                log(f"  {method} @ {target:g}: done earlier ({path.name}), not recomputed")
                continue
            rec = run_cell(model, splits, method, target, ft, cap_cfg, base_acc, log,
                           channel_multiple)
            rec.update(arch=arch, finetune_config=config_dict(ft), cap_config=vars(cap_cfg),
                       **run_record(ft.seed))
            atomic_write_text(json.dumps(rec, indent=2, default=str), path)
            cells.append(rec)
    report(cells, out_dir)
    return cells


def report(cells: list[dict], out_dir: Path) -> str:
    """Markdown table (written to results.md) and accuracy-vs-MACs plot (plot.png)."""
    if not cells:
        raise CaprojError(f"no benchmark cells in {out_dir}")
    cells = sorted(cells, key=lambda c: (-c["target_macs"], -c["acc_after_finetune"]))
    epochs = cells[0]["finetune_config"]["epochs"]
    ftc = cells[0]["finetune_config"]
    lines = [f"Original: {cells[0]['arch']}, {cells[0]['acc_original']:.2f} %, "
             f"{cells[0]['macs_original'] / 1e6:.2f} M MACs. Fine-tune budget for every method: "
             f"{epochs} epoch(s), SGD nesterov, {ftc['schedule']} lr {ftc['lr']}, batch "
             f"{ftc['batch_size']}, crop+flip"
             + (f", KD {ftc['kd_weight']} from the original" if ftc.get('kd_weight') else "")
             + (", BN statistics frozen" if ftc.get('freeze_bn') else "")
             + (f", weight EMA {ftc['ema']:g} (the averaged weights are evaluated)"
                if ftc.get('ema') else "") + ".", "",
             "Speed-ups against the original in the same form, interleaved in the same run: "
             "PyTorch CPU with BN folded + channels_last, and onnxruntime (CPU).", "",
             "| target | method | MACs (M) | params (M) | top-1 before FT | top-1 after FT | "
             "b1 speed-up | b64 speed-up | b1 / b64 onnxruntime | peak act. (KiB) | "
             "compress (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ort(c: dict) -> str:
        b1, b64 = (c.get(f"latency_onnxruntime_b{b}_speedup") for b in (1, 64))
        return f"{b1:.2f}x / {b64:.2f}x" if b1 and b64 else "–"

    def raw(c: dict) -> str:  # with a weight EMA: the raw weights' accuracy beside it
        r = (c.get("finetune_history") or [{}])[-1].get("test_acc_raw")
        return f" (raw {r:.2f})" if r is not None else ""

    for c in cells:
        lines.append(
            f"| {c['target_macs']:g} | {c['method']} | {c['macs'] / 1e6:.2f} | "
            f"{c['params'] / 1e6:.3f} | {c['acc_before_finetune']:.2f} | "
            f"{c['acc_after_finetune']:.2f}{raw(c)} | {c['latency_b1_speedup']:.2f}x | "
            f"{c['latency_b64_speedup']:.2f}x | {ort(c)} | "
            f"{c['peak_activation_bytes'] / 1024:.0f} | {c['compress_seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(text, out_dir / "results.md")
    _plot(cells, out_dir / "plot.png")
    return text


def _plot(cells: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot is optional ([bench] extra); the table is always written
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    methods = sorted({c["method"] for c in cells})
    for ax, key, title in ((axes[0], "acc_before_finetune", "before fine-tuning"),
                           (axes[1], "acc_after_finetune", "after fine-tuning")):
        for m in methods:
            pts = sorted((c["macs"] / 1e6, c[key]) for c in cells if c["method"] == m)
            ax.plot(*zip(*pts, strict=True), marker="o", label=m,
                    linewidth=2.5 if m == "cap" else 1.2)
        ax.axhline(cells[0]["acc_original"], color="grey", linestyle="--", linewidth=1,
                   label="original")
        ax.set_xlabel("MACs (M)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{cells[0]['arch']}: {title}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
