"""End-to-end jobs behind the CLI:
data -> model -> sites -> CaP -> surgery -> fine-tune -> report."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from caproj import dist, metrics
from caproj.budget import MacModel, predict_macs, widths_for_keep, widths_for_macs
from caproj.cap import CaP, CapConfig
from caproj.data import Data, load_data
from caproj.errors import CaprojError
from caproj.models import load_model, make_checkpoint
from caproj.resume import Checkpointer, stop_on_signal
from caproj.sites import Site, require_sites
from caproj.train import TrainConfig, config_dict, evaluate, train
from caproj.utils import atomic_save, check_output_path, pick_device, run_record, seed_everything


@dataclass
class CompressResult:
    model: nn.Module
    sites: list[Site]
    widths: list[int]
    report: dict[str, Any] = field(default_factory=dict)


def compress(model: nn.Module, splits: Data, cap_cfg: CapConfig, *, keep: float | None = None,
             target_macs: float | None = None, finetune: TrainConfig | None = None,
             channel_multiple: int = 8, allocation: str = "uniform",
             stream_projection: bool = False, log=print,
             state_prefix: str | None = None, resume: bool = False,
             save_every: int = 50) -> CompressResult:
    """Compress `model` (left unchanged) with CaP to a keep ratio or a MACs fraction, optionally
    fine-tune, and report accuracy, MACs and params at each stage.

    With `state_prefix`, CaP's optimisation and the fine-tuning save their state to
    `<prefix>.cap-state.pt` / `<prefix>.ft-state.pt` every `save_every` steps and on
    SIGTERM/SIGINT; `resume=True` continues from them. The caller calls `finish_states` once
    the result is saved."""
    if keep is None and target_macs is None:
        target_macs = 0.5
    shape = splits.input_shape
    sites = require_sites(model, stream=stream_projection)
    mm = MacModel.of(model, shape)
    t_alloc = time.perf_counter()
    if allocation == "auto":
        if keep is not None:
            raise CaprojError("--allocate auto chooses the widths for a --target-macs budget; "
                              "it does not combine with --keep")
        from caproj.allocate import auto_widths

        widths = auto_widths(model, sites, mm, splits, target_macs,  # type: ignore[arg-type]
                             channel_multiple, cap_cfg.calib_images, cap_cfg.seed, log=log)
    elif allocation == "uniform":
        widths = widths_for_keep(sites, keep, channel_multiple) if keep is not None else \
            widths_for_macs(mm, sites, target_macs, channel_multiple)  # type: ignore[arg-type]
    else:
        raise CaprojError(f"unknown allocation {allocation!r} (uniform or auto)")
    alloc_seconds = time.perf_counter() - t_alloc
    predicted = predict_macs(mm, sites, widths)
    rep: dict[str, Any] = {"sites": [str(s) for s in sites], "widths": widths,
                           "allocation": allocation, "allocation_seconds": alloc_seconds,
                           "stream_projection": stream_projection,
                           "macs_before": mm.total, "params_before": metrics.count_params(model)}
    log(f"{len(sites)} sites; widths {widths}; predicted MACs {predicted / 1e6:.2f} M "
        f"({predicted / mm.total:.3f} of {mm.total / 1e6:.2f} M)")
    t0 = time.perf_counter()
    cap = CaP(model, sites, widths, cap_cfg, log=log)
    cap_ck = ft_ck = None
    if state_prefix is not None:
        cap_ck = Checkpointer(f"{state_prefix}.cap-state.pt", cap.fingerprint(), save_every,
                              resume, log)
        ft_ck = Checkpointer(f"{state_prefix}.ft-state.pt",
                             {"cap": cap.fingerprint(),
                              "finetune": config_dict(finetune) if finetune else None},
                             save_every, resume, log)
    small = cap.run(splits, checkpoint=cap_ck)
    # a resumed run: + the wall time its interrupted predecessors spent (cap_timings says so)
    rep["compress_seconds"] = (time.perf_counter() - t0 + alloc_seconds
                               + cap.timings.get("earlier_s", 0.0))
    rep["cap_timings"] = cap.timings
    rep["orthonormality_error"] = cap.max_orthonormality_error()
    macs = metrics.count_macs(small, shape)
    if macs != predicted:
        raise CaprojError(f"internal error: MACs after surgery {macs} != predicted {predicted}")
    rep.update(macs_after=macs, params_after=metrics.count_params(small))
    rep["acc_after_cap"] = evaluate(small, splits)["acc"]
    log(f"after CaP (no fine-tuning): {rep['acc_after_cap']:.2f} % in "
        f"{rep['compress_seconds']:.0f} s")
    if finetune is not None and finetune.epochs > 0:
        t1 = time.perf_counter()
        rep["finetune"] = train(small, splits, finetune,
                                teacher=model if finetune.kd_weight > 0 else None, log=log,
                                checkpoint=ft_ck)
        rep["finetune_seconds"] = time.perf_counter() - t1
        rep["acc_after_finetune"] = rep["finetune"][-1]["test_acc"]
    rep["cap_history"] = cap.history
    rep["cap_config"] = cap.config()
    return CompressResult(small, sites, widths, rep)


def finish_states(state_prefix: str) -> None:
    """Remove `compress`'s state files: call after its result is safely written."""
    for kind in ("cap", "ft"):
        Checkpointer(f"{state_prefix}.{kind}-state.pt", {}).finish()


DEPLOY_FORMS = ("eager", "fold_bn_cl", "inductor", "onnxruntime")


def latency_report(orig: nn.Module, small: nn.Module, shape, threads,
                   forms: tuple[str, ...] = DEPLOY_FORMS) -> dict[str, float]:
    """Original vs compressed in each inference form, interleaved in the same run
    (metrics.compare_latency), batch 1 and 64. Forms whose runtime is missing are skipped."""
    from caproj import deploy

    out: dict[str, float] = {}
    with metrics.threads(threads):  # set before runtime sessions (onnxruntime) are created
        for form in forms:
            try:
                o, s = (deploy.for_inference(m, form, shape) for m in (orig, small))
            except CaprojError as e:  # e.g. onnxruntime not installed, no C++ compiler
                print(f"latency: {e}; form skipped")
                continue
            for b in (1, 64):
                r = metrics.compare_latency({"before": o, "after": s}, shape, b,
                                            rounds=15 if b == 1 else 8)
                key = f"latency_{form}_b{b}"
                out[f"{key}_before_ms"] = r["before"]["median_ms"]
                out[f"{key}_after_ms"] = r["after"]["median_ms"]
                out[f"{key}_speedup"] = r["after"]["speedup"]
    return out


def cmd_compress(a: argparse.Namespace) -> None:
    from caproj.cli import _data_and_model, _train_config

    check_output_path(a.out)
    if a.report:
        check_output_path(a.report)
    cap_cfg = CapConfig(init=a.init, calib_images=a.calib_images, steps=a.cap_steps,
                        lr=a.cap_lr, weight_lr=a.cap_weight_lr, batch_size=a.cap_batch_size,
                        recon_weight=a.recon_weight,
                        relax=a.relax, seed=a.seed, kd=a.kd_weight,
                        bf16=False if a.no_bf16 else None)
    cap_cfg.validate()
    ft = _train_config(a)
    ft.validate()
    data, model, meta = _data_and_model(a)
    if meta.get("compressed"):
        raise CaprojError(f"{a.weights} is already compressed; compress the original model")
    acc0 = evaluate(model, data)["acc"]
    print(f"{meta['arch']}: {acc0:.2f} % on {data.name} test")
    with stop_on_signal():
        res = compress(model, data, cap_cfg, keep=a.keep, target_macs=a.target_macs,
                       finetune=ft, channel_multiple=a.channel_multiple,
                       allocation=a.allocate, stream_projection=a.stream_projection,
                       state_prefix=a.out,
                       resume=a.resume, save_every=a.save_every)
    rep = res.report
    rep["acc_before"] = acc0
    if not dist.is_main():
        return  # torchrun: rank 0 measures and writes
    rep.update(latency_report(model.cpu(), res.model.cpu(), data.input_shape, a.threads))
    ck = make_checkpoint(res.model.cpu(), meta["arch"], num_classes=data.num_classes,
                         in_channels=data.input_shape[0], input_shape=list(data.input_shape),
                         compressed=True, data=data.describe(), train_config=config_dict(ft),
                         metrics={k: v for k, v in rep.items() if k not in ("cap_history",)},
                         cap_history=rep["cap_history"], **run_record(a.seed))
    atomic_save(ck, a.out)
    if a.report:
        from caproj.cli import dump_json

        dump_json({"arch": meta["arch"], "data": data.describe(), **rep, **run_record(a.seed)},
                  a.report)
    finish_states(a.out)
    print(format_report(rep))
    print(f"saved {a.out}")


def format_report(rep: dict[str, Any]) -> str:
    def row(name, before, after, fmt):
        ratio = before / after if after else float("nan")
        return f"  {name:22s} {fmt(before):>12s} {fmt(after):>12s}   {ratio:5.2f}x"

    acc_final = rep.get("acc_after_finetune", rep["acc_after_cap"])
    lines = [f"  {'':22s} {'original':>12s} {'compressed':>12s}   ratio",
             f"  {'top-1 accuracy':22s} {rep['acc_before']:11.2f}% {acc_final:11.2f}%"
             + (f"   (after CaP, before fine-tuning: {rep['acc_after_cap']:.2f} %)"
                if "acc_after_finetune" in rep else ""),
             row("MACs", rep["macs_before"], rep["macs_after"], lambda v: f"{v / 1e6:.2f} M"),
             row("params", rep["params_before"], rep["params_after"], lambda v: f"{v / 1e6:.3f} M")]
    for form in DEPLOY_FORMS:
        for b in (1, 64):
            k = f"latency_{form}_b{b}"
            if f"{k}_before_ms" in rep:
                lines.append(f"  {f'latency {form} b{b}':22s} {rep[f'{k}_before_ms']:9.2f} ms "
                             f"{rep[f'{k}_after_ms']:9.2f} ms   {rep[f'{k}_speedup']:5.2f}x")
    if any(k.startswith("latency_") for k in rep):
        lines.append("  (latency: medians of interleaved rounds; ratio = median of per-round "
                     "ratios)")
    return "\n".join(lines)


def cmd_demo(a: argparse.Namespace) -> None:
    """Train digits-cnn on scikit-learn's digits, then compress it to half its MACs with CaP."""
    if a.out:
        check_output_path(a.out)
    device = pick_device(a.device)
    seed_everything(a.seed)
    data = load_data("digits")
    model, _ = load_model(None, "digits-cnn", data.num_classes, 1)
    model.to(device)
    print(f"digits: {len(data.train_y)} train / {len(data.test_y)} test images of 8x8")
    train(model, data, TrainConfig(epochs=15, lr=0.05, batch_size=64, seed=a.seed),
          log=lambda s: None)
    acc = evaluate(model, data)["acc"]
    print(f"trained digits-cnn: {acc:.2f} % test accuracy")
    cap_cfg = CapConfig(calib_images=1000, steps=60, batch_size=64, seed=a.seed, log_every=0)
    ft = TrainConfig(epochs=5, lr=0.02, batch_size=64, seed=a.seed, kd_weight=0.5)
    res = compress(model, data, cap_cfg, target_macs=0.5, finetune=ft, log=lambda s: None)
    rep = res.report
    rep["acc_before"] = acc
    rep.update(latency_report(model.cpu(), res.model.cpu(), data.input_shape, a.threads,
                              forms=("eager",)))
    print(f"CaP to 50 % MACs ({len(res.sites)} sites, widths {res.widths}):")
    print(format_report(rep))
    if a.out:
        ck = make_checkpoint(res.model.cpu(), "digits-cnn", num_classes=10, in_channels=1,
                             input_shape=[1, 8, 8], compressed=True, data=data.describe(),
                             metrics={k: v for k, v in rep.items() if k != "cap_history"},
                             **run_record(a.seed))
        atomic_save(ck, a.out)
        print(f"saved {a.out}")


def cmd_bench(a: argparse.Namespace) -> None:
    from pathlib import Path

    from caproj import bench
    from caproj.cli import _data_and_model, _train_config

    try:
        targets = [float(t) for t in a.targets.split(",")]
    except ValueError:
        raise CaprojError(f"--targets must be comma-separated numbers, got {a.targets!r}") from None
    for t in targets:
        if not 0 < t <= 1:
            raise CaprojError(f"--targets values must be in (0, 1], got {t}")
    from caproj.methods import check_methods

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    check_methods(methods)
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        raise CaprojError(f"--out-dir {out} exists and is not a directory")
    ft = _train_config(a)
    ft.validate()
    data, model, meta = _data_and_model(a)
    cap_cfg = CapConfig(steps=a.cap_steps, seed=a.seed, log_every=0, kd=ft.kd_weight,
                        bf16=False if a.no_bf16 else None)  # --kd: distil in CaP and FT alike
    bench.run(model, data, meta["arch"], methods, targets, ft, cap_cfg, out,
              channel_multiple=a.channel_multiple)
    print((out / "results.md").read_text())
