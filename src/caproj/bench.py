"""Side-by-side benchmark: one model x methods x MACs targets, the same fine-tune budget each.

Each (method, target[, seed]) cell records accuracy before and after fine-tuning, MACs, params,
CPU latency at batch 1 and 64 (interleaved with the original in the same run), peak activation
memory, compression wall time and the training images it consumed (CaP's optimisation steps x
batch + fine-tuning steps x batch), in its own JSON file (with seed, versions, command). A
finished cell is never recomputed, so an interrupted run resumes where it stopped, and a table
can grow across sessions. `report` turns the cells into a Markdown table (mean ± std over
seeds) and a matplotlib plot of accuracy against MACs (error bars over seeds).

Fair compute (`equal_compute=True`): every method gets the same total of training images, the
largest any method's recipe consumes; the others' fine-tuning is extended by the difference
(whole epochs plus a step cap, so the one-cycle schedule spans exactly the images given).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caproj import metrics
from caproj.api import compress, evaluate
from caproj.batches import steps_per_pass
from caproj.config import CapConfig, TrainConfig
from caproj.deploy import latency_report
from caproj.errors import CaprojError
from caproj.methods import METHODS
from caproj.stages import cap_steps_of, finetune_for
from caproj.utils import atomic_write_text, run_record

log = logging.getLogger(__name__)

# A method in the bench may carry options, spelled as its compress flags without "--":
# method:flag=value:flag (a flag alone is true; values read as JSON, else as strings), e.g.
# cp:match-scale:ridge-to=projected:ridge=0.1 (the "deep" preset's start) or
# cap:stream-projection:allocation=auto. CaP's flags set CapConfig fields, training flags this
# method's fine-tuning (TrainConfig), and stream-projection / allocation compress's own.
COMPRESS_OPTIONS = {"stream-projection": "stream_projection", "allocation": "allocation"}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cap: dict[str, Any]
    finetune: dict[str, Any]
    compress: dict[str, Any]


def _option_keys() -> dict[str, tuple[str, str]]:
    keys = {k: ("compress", v) for k, v in COMPRESS_OPTIONS.items()}
    for part, cls in (("cap", CapConfig), ("finetune", TrainConfig)):
        for f in dataclasses.fields(cls):
            if "flag" in f.metadata:
                keys[f.metadata["flag"].removeprefix("--")] = (part, f.name)
    return keys


def parse_method(spec: str) -> MethodSpec:
    """A bench method spec "name:flag=value:flag..." -> its method and options, checked."""
    base, *pairs = spec.split(":")
    if base not in METHODS:
        raise CaprojError(f"unknown method {base!r}; choose from {', '.join(METHODS)}",
                          param="method")
    keys = _option_keys()
    parts: dict[str, dict[str, Any]] = {"cap": {}, "finetune": {}, "compress": {}}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if k not in keys:
            raise CaprojError(f"unknown option {k!r} in method {spec!r}: use compress's flag "
                              f"names without '--' ({', '.join(sorted(keys))})", param="method")
        try:
            value = json.loads(v) if sep else True
        except ValueError:
            value = v
        part, name = keys[k]
        parts[part][name] = value
    CapConfig().replace(**parts["cap"])  # bad values fail before any work
    TrainConfig().replace(**parts["finetune"])
    return MethodSpec(base, **parts)


def cell_path(out_dir: Path, method: str, target: float, seed: int | None = None,
              equal_compute: bool = False) -> Path:
    """A cell's file; single-seed runs of earlier versions keep their names."""
    tag = (f"-s{seed}" if seed is not None else "") + ("-eq" if equal_compute else "")
    return out_dir / f"{method.replace(':', '+')}-{target:g}{tag}.json"


def compress_images(method: str, cap_cfg: CapConfig) -> int:
    """Training images a method's compression consumes (CaP's optimisation steps x batch)."""
    spec = parse_method(method)
    return cap_steps_of(METHODS[spec.name], cap_cfg.replace(**spec.cap)) * cap_cfg.batch_size


def run_cell(model: nn.Module, train: Iterable, calib: Iterable, test: Iterable, method: str,
             target: float, ft: TrainConfig, cap_cfg: CapConfig, base_acc: float,
             channel_multiple: int = 8, latency: bool = True,
             state_path: Path | None = None) -> dict[str, Any]:
    """One (method, target) cell through `caproj.compress`: the same data, calibration images,
    fine-tune recipe and teacher for every method. `latency=False` skips the CPU latency
    report (its fields are then absent, not guessed). `state_path`: resumable CaP and
    fine-tune state (`caproj.compress`'s), so a stopped cell continues where it stopped."""
    spec = parse_method(method)
    ft = ft.replace(**spec.finetune)
    torch.manual_seed(ft.seed)
    # the bench's CaP settings go to every method, except those a method fixes (cp's steps):
    # only the cell's own options may ask a method for something it refuses
    fixed = getattr(METHODS[spec.name], "overrides", {})
    cap_opts = {k: v for k, v in cap_cfg.replace(**spec.cap).as_dict().items()
                if k != "seed" and (k not in fixed or k in spec.cap)}
    res = compress(model, train, preset=None, target_macs=target, method=spec.name,
                   calib_data=calib, eval_data=test, finetune=ft if ft.epochs else None,
                   seed=cap_cfg.seed, channel_multiple=channel_multiple, progress=False,
                   state_path=None if state_path is None else str(state_path),
                   resume=state_path is not None,
                   **spec.compress,
                   **cap_opts)
    rep = res.report
    shape = tuple(rep["input_shape"])
    small = res.model.eval()
    cap_steps = len(rep.get("cap_history", []))
    rec: dict[str, Any] = {
        "method": method, "target_macs": target, "widths": res.widths,
        "compress_seconds": rep["compress_seconds"],
        "acc_original": base_acc,
        "macs_original": rep["macs_before"], "macs": rep["macs_after"],
        "params_original": metrics.count_params(model), "params": rep["params_after"],
        "acc_before_finetune": rep["acc_after_compress"],
        "finetune_seconds": rep.get("finetune_seconds", 0.0),
        "finetune_history": rep.get("finetune", []),
        "acc_after_finetune": rep.get("acc_after_finetune", rep["acc_after_compress"]),
        "compress_images": cap_steps * cap_cfg.batch_size,
        "cap_config": rep.get("cap_config", rep["cap_config_requested"]),  # as this cell ran
    }
    if ft.feature_weight:
        rec["finetune_feature_weight"] = ft.feature_weight
    if rep.get("finetune_config", {}).get("factored"):  # set by the spec or the method
        rec["finetune_factored"] = rep["finetune_config"]["factored_ramp"]
    if "match_scale" in rep:  # match-scale: each layer's size ratio before it was rescaled
        rec["match_scale"] = rep["match_scale"]
    log.info("  %s @ %g: %.2f %% before fine-tuning (%.0f s)", method, target,
             rec["acc_before_finetune"], rec["compress_seconds"])
    if latency:
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


def run(model: nn.Module, train: Iterable | Callable[[int], Iterable], calib: Iterable,
        test: Iterable, arch: str, methods: list[str], targets: list[float], ft: TrainConfig,
        cap_cfg: CapConfig, out_dir: Path, channel_multiple: int = 8,
        seeds: list[int] | None = None, equal_compute: bool = False,
        budget_images: int | None = None, latency: bool = True) -> list[dict]:
    """Every (target, method, seed) cell, resumed from `out_dir` where already measured.

    `train`: the training batches, or `train(seed)` giving each seed its own data order.
    `seeds`: one cell per seed (None: one cell at ft.seed, files named as before).
    `equal_compute`: every method consumes the same number of training images (the largest
    compression + fine-tuning total among `methods` and the cells already stored in `out_dir`
    with this recipe, or `budget_images` when given), extending the others' fine-tuning.
    `latency=False`: no CPU latency report per cell (a long bench on a GPU box, say).
    A cell stopped part-way (SIGTERM, a time limit) leaves `<cell>.cap-state.pt` /
    `.ft-state.pt` beside its file, and the next run continues it from there."""
    for m in methods:
        parse_method(m)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_acc = evaluate(model, test)["acc"]
    log.info("%s: %.2f %% original", arch, base_acc)
    first = train(ft.seed) if callable(train) else train
    spe = steps_per_pass(first)
    if spe is None:
        raise CaprojError("the bench needs training batches of known length", param="train")
    epoch_images = spe * ft.batch_size
    planned = {m: compress_images(m, cap_cfg) + ft.epochs * epoch_images for m in methods}
    budget = max(planned.values())
    if equal_compute:
        budget = _equal_budget(budget, budget_images, out_dir, arch, methods, ft, cap_cfg)
    cells = []
    mine: set[str] = set()  # this run's cell files
    for seed in (seeds if seeds is not None else [None]):
        s = ft.seed if seed is None else seed
        data = train(s) if callable(train) else train
        for target in targets:
            for method in methods:
                ft_m = ft.replace(seed=s)
                if equal_compute:
                    ft_m = finetune_for(budget - compress_images(method, cap_cfg), ft_m,
                                        epoch_images)
                path = cell_path(out_dir, method, target, seed, equal_compute)
                mine.add(path.name)
                done = _done_cell(path, ft_m)
                if done is not None:
                    cells.append(done)
                    log.info("  %s @ %g (seed %s): done earlier (%s), not recomputed", method,
                             target, s, path.name)
                    continue
                rec = run_cell(model, data, calib, test, method, target, ft_m,
                               cap_cfg.replace(seed=s), base_acc, channel_multiple, latency,
                               state_path=path.with_suffix(""))  # a stopped cell resumes
                ft_steps = min(ft_m.epochs * spe, ft_m.max_steps or ft_m.epochs * spe)
                rec.update(arch=arch, target=target, finetune_config=ft_m.as_dict(),
                           finetune_epochs=ft_m.epochs, finetune_steps=ft_steps,
                           finetune_images=ft_steps * ft_m.batch_size,
                           train_images=rec["compress_images"] + ft_steps * ft_m.batch_size,
                           equal_compute=equal_compute,
                           acc_before_ft=rec["acc_before_finetune"],
                           acc_after_ft=rec["acc_after_finetune"], **run_record(s))
                atomic_write_text(json.dumps(rec, indent=2, default=str), path)
                cells.append(rec)
    report(cells + _earlier_cells(out_dir, arch, equal_compute, ft, mine, len(cells)), out_dir)
    return cells


def _equal_budget(budget: int, budget_images: int | None, out_dir: Path, arch: str,
                  methods: list[str], ft: TrainConfig, cap_cfg: CapConfig) -> int:
    """The training images every cell gets: `budget_images`, else the largest planned total,
    and never less than the folder's earlier cells with this recipe had (a later run with
    fewer methods keeps the folder's budget)."""
    budget = max([budget] + [
        c.get("train_images") or 0 for c in stored_cells(out_dir).values()
        if c.get("arch") == arch and c.get("equal_compute")
        and _recipe(c.get("finetune_config") or {}) == _recipe(ft.as_dict())])
    if budget_images is not None:
        need = max(compress_images(m, cap_cfg) for m in methods)
        if budget_images <= need:
            raise CaprojError(f"budget_images {budget_images} leaves no fine-tuning after "
                              f"the {need} images compression consumes", param="budget_images")
        budget = budget_images
    log.info("equal compute: %d training images per cell", budget)
    return budget


def _done_cell(path: Path, ft: TrainConfig) -> dict[str, Any] | None:
    """A cell measured earlier with this exact recipe, or None; another recipe is refused."""
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    stored = done.get("finetune_config")  # keys added later: their defaults
    if stored is None or {**TrainConfig().as_dict(), **stored} != ft.as_dict():
        raise CaprojError(f"{path} was fine-tuned with another recipe "
                          f"({done.get('finetune_config')}); use a new out_dir")
    return done


def _earlier_cells(out_dir: Path, arch: str, equal_compute: bool, ft: TrainConfig,
                   mine: set[str], n_mine: int) -> list[dict[str, Any]]:
    """The folder's other cells with this recipe: the table covers every seed and method
    measured there, not only this run's (a later run for one more seed must not shrink it)."""
    earlier, other = [], 0
    for n, c in stored_cells(out_dir).items():
        if n in mine or c.get("arch") != arch or bool(c.get("equal_compute")) != equal_compute:
            continue
        if _recipe(c.get("finetune_config") or {}) == _recipe(ft.as_dict()):
            earlier.append(c)
        else:
            other += 1
    if earlier:
        log.info("table: %d cells of this run and %d from earlier runs in %s", n_mine,
                 len(earlier), out_dir)
    if other:
        log.warning("table: %d cells in %s were fine-tuned with another recipe; left out",
                    other, out_dir)
    return earlier


def _recipe(cfg: dict[str, Any]) -> dict[str, Any]:
    """A fine-tune recipe without what differs between the cells of one table (the seed, and
    the epochs and step cap that equal compute sets per method); missing keys at defaults."""
    return {k: v for k, v in {**TrainConfig().as_dict(), **cfg}.items()
            if k not in ("seed", "epochs", "max_steps")}


def stored_cells(out_dir: Path) -> dict[str, dict]:
    """Every finished cell in `out_dir` (file name -> record); other JSON files are skipped."""
    out = {}
    for p in sorted(out_dir.glob("*.json")):
        try:
            c = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(c, dict) and {"method", "target_macs", "acc_after_finetune"} <= c.keys():
            out[p.name] = c
    return out


def report(cells: list[dict], out_dir: Path) -> str:
    """Markdown table (written to results.md) and accuracy-vs-MACs plot (plot.png)."""
    if not cells:
        raise CaprojError(f"no benchmark cells in {out_dir}")
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["target_macs"], c["method"], bool(c.get("equal_compute"))),
                          []).append(c)
    rows = sorted(groups.values(), key=lambda g: (-g[0]["target_macs"],
                                                  -_mean(g, "acc_after_finetune")))
    ftc = cells[0]["finetune_config"]
    epochs = ftc["epochs"]
    eq = any(c.get("equal_compute") for c in cells)
    budget = ("the same training images for every method (fine-tuning extended to match; "
              "the images column)" if eq else f"{epochs} epoch(s)")
    lines = [f"Original: {cells[0]['arch']}, {cells[0]['acc_original']:.2f} %, "
             f"{cells[0]['macs_original'] / 1e6:.2f} M MACs. Fine-tune budget for every method: "
             f"{budget}, SGD nesterov, {ftc['schedule']} lr {ftc['lr']}, batch "
             f"{ftc['batch_size']}, crop+flip"
             + (f", KD {ftc['kd_weight']} from the original" if ftc.get('kd_weight') else "")
             + (", BN statistics frozen" if ftc.get('freeze_bn') else "")
             + (f", weight EMA {ftc['ema']:g} (the averaged weights are evaluated)"
                if ftc.get('ema') else "") + ". Accuracies: mean ± std over the seeds (n).", "",
             ("Speed-ups against the original in the same form, interleaved in the same run: "
              "PyTorch CPU with BN folded + channels_last, and onnxruntime (CPU)."
              if any(c.get("latency_b1_speedup") for c in cells) else
              "Latency not measured in these cells (--no-latency): speed-up columns are –."),
             "",
             "| target | method | MACs (M) | params (M) | top-1 before FT | top-1 after FT | "
             "train images (k) | b1 speed-up | b64 speed-up | b1 / b64 onnxruntime | "
             "peak act. (KiB) | compress (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ort(c: dict) -> str:
        b1, b64 = (c.get(f"latency_onnxruntime_b{b}_speedup") for b in (1, 64))
        return f"{b1:.2f}x / {b64:.2f}x" if b1 and b64 else "–"

    def raw(c: dict) -> str:  # with a weight EMA: the raw weights' accuracy beside it
        r = (c.get("finetune_history") or [{}])[-1].get("test_acc_raw")
        return f" (raw {r:.2f})" if r is not None else ""

    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v else "–"

    for g in rows:
        c = g[0]
        images = c.get("train_images")
        lines.append(
            f"| {c['target_macs']:g} | {c['method']} | {c['macs'] / 1e6:.2f} | "
            f"{c['params'] / 1e6:.3f} | {_pm(g, 'acc_before_finetune')} | "
            f"{_pm(g, 'acc_after_finetune')}{raw(c) if len(g) == 1 else ''} | "
            f"{'–' if images is None else f'{images / 1e3:.0f}'} | "
            f"{x(c.get('latency_b1_speedup'))} | "
            f"{x(c.get('latency_b64_speedup'))} | {ort(c)} | "
            f"{c['peak_activation_bytes'] / 1024:.0f} | {c['compress_seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(text, out_dir / "results.md")
    _plot(cells, out_dir / "plot.png")
    return text


def _mean(group: list[dict], key: str) -> float:
    return statistics.fmean(c[key] for c in group)


def _pm(group: list[dict], key: str) -> str:
    """mean ± std (n) over seeds; a single cell as before."""
    if len(group) == 1:
        return f"{group[0][key]:.2f}"
    vals = [c[key] for c in group]
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)})"


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
        for m in methods:  # mean over seeds, error bars = std
            per: dict[float, list[dict]] = {}
            for c in cells:
                if c["method"] == m:
                    per.setdefault(c["macs"] / 1e6, []).append(c)
            xs = sorted(per)
            ys = [_mean(per[v], key) for v in xs]
            es = [statistics.stdev([c[key] for c in per[v]]) if len(per[v]) > 1 else 0.0
                  for v in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m,
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
