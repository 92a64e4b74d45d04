"""Side-by-side benchmark: one model x methods x MACs targets, the same fine-tune budget each.

Each (method, target) cell records accuracy before and after fine-tuning, MACs, params, CPU
latency at batch 1 and 64 (interleaved with the original in the same run), peak activation
memory and compression wall time, in its own JSON file (with seed, versions, command). A
finished cell is never recomputed, so an interrupted run resumes where it stopped. `report`
turns the cells into a Markdown table and a matplotlib plot of accuracy against MACs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caproj import metrics
from caproj.api import compress, evaluate
from caproj.config import CapConfig, TrainConfig
from caproj.deploy import latency_report
from caproj.errors import CaprojError
from caproj.methods import METHODS
from caproj.utils import atomic_write_text, run_record

log = logging.getLogger(__name__)

# A method in the bench may carry options, spelled as suffixes of its cell name (so the cells
# of earlier runs keep their file names): cap+stream, cap+auto, cap+stream+auto.
OPTION_SUFFIXES = {"stream": {"stream_projection": True}, "auto": {"allocation": "auto"}}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """A bench method spec -> (registered method, compress options)."""
    base, *flags = spec.split("+")
    if base not in METHODS:
        raise CaprojError(f"unknown method {base!r}; choose from {', '.join(METHODS)}",
                          param="method")
    opts: dict[str, Any] = {}
    for f in flags:
        if f not in OPTION_SUFFIXES:
            raise CaprojError(f"unknown option +{f} in method {spec!r}; known: "
                              f"{', '.join('+' + k for k in OPTION_SUFFIXES)}", param="method")
        opts.update(OPTION_SUFFIXES[f])
    return base, opts


def cell_path(out_dir: Path, method: str, target: float) -> Path:
    return out_dir / f"{method}-{target:g}.json"


def run_cell(model: nn.Module, train: Iterable, calib: Iterable, test: Iterable, method: str,
             target: float, ft: TrainConfig, cap_cfg: CapConfig, base_acc: float,
             channel_multiple: int = 8) -> dict[str, Any]:
    """One (method, target) cell through `caproj.compress`: the same data, calibration images,
    fine-tune recipe and teacher for every method."""
    base, opts = parse_method(method)
    torch.manual_seed(ft.seed)
    res = compress(model, train, target_macs=target, method=base, calib_data=calib,
                   eval_data=test, finetune=ft if ft.epochs else None, seed=cap_cfg.seed,
                   channel_multiple=channel_multiple, progress=False,
                   **opts, **{k: v for k, v in cap_cfg.as_dict().items() if k != "seed"})
    rep = res.report
    shape = tuple(rep["input_shape"])
    small = res.model.eval()
    rec: dict[str, Any] = {
        "method": method, "target_macs": target, "widths": res.widths,
        "compress_seconds": rep["compress_seconds"], "acc_original": base_acc,
        "macs_original": rep["macs_before"], "macs": rep["macs_after"],
        "params_original": rep["params_before"], "params": rep["params_after"],
        "acc_before_finetune": rep["acc_after_compress"],
        "finetune_seconds": rep.get("finetune_seconds", 0.0),
        "finetune_history": rep.get("finetune", []),
        "acc_after_finetune": rep.get("acc_after_finetune", rep["acc_after_compress"]),
    }
    log.info("  %s @ %g: %.2f %% before fine-tuning (%.0f s)", method, target,
             rec["acc_before_finetune"], rec["compress_seconds"])
    lat = latency_report(model, small, shape, None)  # eager, BN folded + cl, inductor, ort
    rec.update(lat)
    for b in (1, 64):  # the headline: one fixed deploy form for every method
        rec[f"latency_b{b}_ms"] = lat.get(f"latency_fold_bn_cl_b{b}_after_ms")
        rec[f"latency_b{b}_original_ms"] = lat.get(f"latency_fold_bn_cl_b{b}_before_ms")
        rec[f"latency_b{b}_speedup"] = lat.get(f"latency_fold_bn_cl_b{b}_speedup")
    rec["peak_activation_bytes"] = metrics.peak_activation_bytes(small, shape)
    rec["peak_activation_bytes_original"] = metrics.peak_activation_bytes(model, shape)
    log.info("  %s @ %g: %.2f %% after %d fine-tune epochs", method, target,
             rec["acc_after_finetune"], ft.epochs)
    rec["seed"] = rep["seed"]
    return rec


def run(model: nn.Module, train: Iterable, calib: Iterable, test: Iterable, arch: str,
        methods: list[str], targets: list[float], ft: TrainConfig, cap_cfg: CapConfig,
        out_dir: Path, channel_multiple: int = 8) -> list[dict]:
    for m in methods:
        parse_method(m)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_acc = evaluate(model, test)["acc"]
    log.info("%s: %.2f %% original", arch, base_acc)
    cells = []
    for target in targets:
        for method in methods:
            path = cell_path(out_dir, method, target)
            if path.is_file():
                done = json.loads(path.read_text())
                stored = done.get("finetune_config")  # keys added later: their defaults
                if stored is None or {**TrainConfig().as_dict(), **stored} != ft.as_dict():
                    raise CaprojError(f"{path} was fine-tuned with another recipe "
                                      f"({done.get('finetune_config')}); use a new out_dir")
                cells.append(done)
                log.info("  %s @ %g: done earlier (%s), not recomputed", method, target,
                         path.name)
                continue
            rec = run_cell(model, train, calib, test, method, target, ft, cap_cfg, base_acc,
                           channel_multiple)
            rec.update(arch=arch, finetune_config=ft.as_dict(), cap_config=cap_cfg.as_dict(),
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

    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v else "–"

    for c in cells:
        lines.append(
            f"| {c['target_macs']:g} | {c['method']} | {c['macs'] / 1e6:.2f} | "
            f"{c['params'] / 1e6:.3f} | {c['acc_before_finetune']:.2f} | "
            f"{c['acc_after_finetune']:.2f}{raw(c)} | {x(c.get('latency_b1_speedup'))} | "
            f"{x(c.get('latency_b64_speedup'))} | {ort(c)} | "
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
