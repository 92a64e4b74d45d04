"""caproj's public API: compress, finetune, evaluate, save, load, over any model and any
iterable of batches.

    import caproj
    res = caproj.compress(model, train_loader, target_macs=0.5)      # CaP, seed 0
    caproj.finetune(res.model, train_loader, epochs=3, teacher=model)
    print(caproj.evaluate(res.model, test_loader))                   # {'acc': ..., 'loss': ...}
    caproj.save(res.model, "small.pt")
    small = caproj.load("small.pt", model=MyNet())                   # your class, narrowed

`data` is whatever the model already trains on: a DataLoader (or any re-iterable) yielding
(x, y), (x,) or bare x. Without labels compression is label-free. caproj adds no
normalisation or augmentation; calibration uses the first `calib_images` images as given (pass
`calib_data=` for an unaugmented loader). The library logs through `logging` ("caproj") and
raises `CaprojError` naming the parameter at fault; it never prints.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caproj import batches as B
from caproj import dist, metrics
from caproj import latency as L
from caproj.cap import input_shape_of
from caproj.config import (
    CHANNEL_MULTIPLE,
    FINETUNE,
    LEARN_RATIO,
    RECIPES,
    SAVE_EVERY,
    CapConfig,
    TrainConfig,
)
from caproj.errors import CaprojError
from caproj.methods import Job, Method, get_method, method_name
from caproj.models import (
    check_finite,
    check_state_dict,
    load_model,
    make_checkpoint,
    read_checkpoint,
    write_safetensors,
)
from caproj.plan import Plan
from caproj.resume import Checkpointer
from caproj.surgery import match_weight_scale, resize_to_state_dict
from caproj.synth import synthesize
from caproj.train import LossFn, OutputTransform, fit, model_device, outputs_of
from caproj.train import evaluate as _evaluate_impl
from caproj.utils import atomic_path, atomic_save, run_record, seed_everything

log = logging.getLogger(__name__)

__all__ = ["Result", "compress", "choose_recipe", "finetune", "evaluate", "save", "load",
           "synthesize"]


@dataclass
class Result:
    """What `compress` returns. `model` is a plain nn.Module, physically narrower than the
    input model (which is left untouched); `widths` the channels kept per site; `report` a
    JSON-able dict: MACs/params before and after, timings, configuration, seed, versions."""

    model: nn.Module
    widths: list[int] | None
    report: dict[str, Any] = field(default_factory=dict)
    sites: list[Any] = field(default_factory=list)


def _peek(data: Iterable, name: str) -> tuple[torch.Tensor, bool]:
    B.check_iterable(data, name)
    for x, y in B.iterate(data):
        return x, y is not None
    raise CaprojError(f"{name} is empty: it yielded no batch", param=name)


def _count_images(data: Iterable) -> int | None:
    """Distinct images in `data` where it says (caproj's batches, a DataLoader over a sized
    dataset, a list of batches); None where it cannot tell (a stream, a generator)."""
    n = getattr(data, "n", None)  # caproj's Batches (and WithoutLabels over them)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    ds = getattr(data, "dataset", None)
    if ds is not None and hasattr(ds, "__len__") and not getattr(data, "sharded", False):
        try:
            return len(ds)
        except TypeError:
            return None
    if isinstance(data, (list, tuple)):
        return sum(len(B.split(b)[0]) for b in data) or None
    return None


def _finetune_config(finetune: int | Mapping[str, Any] | TrainConfig | None, seed: int,
                     has_teacher: bool, base: TrainConfig = FINETUNE) -> TrainConfig | None:
    if finetune is None or finetune is False:
        return None
    if isinstance(finetune, TrainConfig):
        return finetune
    if isinstance(finetune, bool) or not isinstance(finetune, (int, Mapping)):
        raise CaprojError("finetune must be a number of epochs, a dict of recipe options or a "
                          "TrainConfig", param="finetune")
    opts: dict[str, Any] = {"epochs": finetune} if isinstance(finetune, int) else dict(finetune)
    opts.setdefault("seed", seed)
    if not has_teacher:
        opts.setdefault("kd_weight", 0.0)
    cfg = base.replace(**opts)
    return cfg if cfg.epochs > 0 else None


def choose_recipe(model: nn.Module, train_data: Iterable, eval_data: Iterable | None, *,
                  loss_fn: LossFn | None = None, output_transform: OutputTransform | None = None,
                  max_batches: int = 16, test_loss: float | None = None) -> dict[str, Any]:
    """Which fine-tune recipe suits compressing `model` on this data: {"recipe": "polish" |
    "learn", "train_loss", "test_loss", "ratio", "threshold"} (or a "reason" where it could
    not measure).

    "polish" (`caproj.FINETUNE`: peak lr 0.005, KD 0.5 from the original) keeps a start that
    already fits the data; "learn" (`caproj.FINETUNE_LEARN`: peak lr 0.02, no KD) suits an
    original that does not fit the training data yet (trained on other data or preprocessing),
    whose predictions would cap the student. The test: the original's mean loss on up to
    `max_batches` batches of `train_data` (unaugmented training images, as a calibration set
    is) above `caproj.config.LEARN_RATIO` x its loss on `eval_data` means "learn". A heuristic
    measured on four starts (RESULTS.md); pass the recipe explicitly to override it.
    `test_loss`: the original's loss on `eval_data` when already measured (not re-measured)."""
    if eval_data is None:
        return {"recipe": "polish", "reason": "no eval_data to compare the training loss with"}
    if not _peek(train_data, "train_data")[1]:
        return {"recipe": "polish", "reason": "unlabelled training data (distillation needed)"}
    kw: dict[str, Any] = {"loss_fn": loss_fn, "output_transform": output_transform,
                          "progress_bar": False}
    tr = _evaluate_impl(model, train_data, max_batches=max_batches, **kw)["loss"]
    te = _evaluate_impl(model, eval_data, **kw)["loss"] if test_loss is None else test_loss
    ratio = tr / te if te > 0 else math.inf
    learn = dist.any_rank(ratio > LEARN_RATIO)  # under torchrun every rank takes one recipe
    return {"recipe": "learn" if learn else "polish", "train_loss": tr,
            "test_loss": te, "ratio": ratio, "threshold": LEARN_RATIO}


def compress(model: nn.Module, data: Iterable | None = None, *, target_macs: float | None = None,
             keep: float | None = None, method: str | Method = "cap",
             example_inputs: torch.Tensor | None = None, calib_images: int | None = None,
             steps: int | None = None, loss_fn: LossFn | None = None,
             teacher: nn.Module | None = None,
             finetune: int | Mapping[str, Any] | TrainConfig | None = None, seed: int = 0,
             progress: bool = True, calib_data: Iterable | None = None,
             eval_data: Iterable | None = None,
             output_transform: OutputTransform | None = None, stream_projection: bool = False,
             allocation: str = "uniform", channel_multiple: int | None = None,
             widths: list[int] | None = None, label_free: bool = False,
             target_latency: float | None = None, runtime: str = "eager",
             latency_batch: int = 1, latency_threads: int | None = None,
             synthetic: int | None = None, synth_options: Mapping[str, Any] | None = None,
             state_path: str | os.PathLike | None = None, resume: bool = False,
             save_every: int = SAVE_EVERY, recipe: str = "auto", **options: Any) -> Result:
    """Compress `model` (left untouched) to `target_macs` (fraction of its MACs; default 0.5),
    `keep` (fraction of channels per site) or `target_latency` (fraction of its measured
    latency) with `method` (a registered name, see `caproj.METHODS`, or a plug-in), optionally
    fine-tune, and report.

    data: iterable of batches (x, y) / (x,) / x: CaP's optimisation, Taylor scores, the
        fine-tuning. calib_data: where calibration images come from (default: data).
    synthetic: data-free: instead of `data`, synthesise this many images from the model's
        BatchNorm statistics (`caproj.synthesize`; needs `example_inputs` for the shape;
        `synth_options`: `caproj.SynthConfig` fields) and compress (and fine-tune) on them,
        label-free. The set is cached in caproj's cache dir (keyed by the weights, settings
        and N) for the next job; the report's "data_free" records the synthesis.
    eval_data: labelled batches; if given the report holds top-1 before/after each stage.
    label_free: ignore the labels `data` and `calib_data` may carry (distillation from the
        original plus reconstruction only, in CaP and in the fine-tuning); data without labels
        is label-free anyway. eval_data keeps its labels.
    example_inputs: for tracing and MACs (default: the first batch's inputs).
    calib_images, steps, **options: CaP settings (`caproj.CapConfig` fields: lr, weight_lr,
        kd, init, batch_size, relax, ...).
    loss_fn(outputs, targets): replaces cross-entropy; output_transform(model output) ->
        logits for models returning a tuple/dict; teacher: distil from it (default: model).
    finetune: epochs (int), a dict of recipe options (`caproj.TrainConfig` fields) or a
        TrainConfig (used as given). A number or dict starts from `recipe`'s options.
    recipe: "polish" (`caproj.FINETUNE`: SGD one-cycle peak lr 0.005, KD 0.5), "learn"
        (`caproj.FINETUNE_LEARN`: peak lr 0.02, no KD, and CaP's `kd` 0 unless given) or
        "auto" (default): `choose_recipe` on calib_data (else data) and eval_data, recorded
        in the report's "recipe". Only read when fine-tuning.
    stream_projection, allocation ("uniform" | "auto"), channel_multiple, widths: what is
        narrowed and how the budget is spread.
    target_latency, runtime ("eager" | "inductor" | "onnxruntime"), latency_batch,
        latency_threads: budget the latency the compressed model will have in that runtime at
        that batch size and thread count (`caproj.latency`: per-layer times measured here and
        cached on disk; the chosen widths are measured before compression and tightened if
        they miss). The report's "latency" holds original and compressed measured
        interleaved (3 runs) next to the prediction. On CPU (glibc) this fixes the process's
        malloc thresholds (`caproj.utils.steady_allocator`) so that times are steady.
    state_path: save resumable state to `<state_path>.cap-state.pt` / `.ft-state.pt` every
        `save_every` steps and on SIGTERM/SIGINT; resume=True continues from it. The state
        files are removed when the job finishes.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise CaprojError(f"model must be an nn.Module, got {type(model).__name__}",
                          param="model")
    syn = None
    if synthetic is not None:
        if data is not None or calib_data is not None:
            raise CaprojError("give data (real images) or synthetic=N (data-free), not both",
                              param="synthetic")
        if example_inputs is None:
            raise CaprojError("synthetic=N needs example_inputs=... (an input batch of the "
                              "model, for the image shape)", param="example_inputs")
        dev = model_device(model)
        syn = synthesize(model, synthetic, input_shape_of(example_inputs), seed=seed,
                         progress=progress, state_path=state_path, resume=resume, cache=True,
                         output_transform=output_transform, **dict(synth_options or {}))
        size = CapConfig(batch_size=options.get("batch_size", CapConfig.batch_size)).batch_size
        data = syn.batches(size, train=True, seed=seed, device=dev)
        calib_data = syn.batches(250, device=dev)
    elif data is None:
        raise CaprojError("data is required: an iterable of batches (a DataLoader, ...), or "
                          "synthetic=N to compress without data", param="data")
    elif synth_options is not None:
        raise CaprojError("synth_options apply only with synthetic=N", param="synth_options")
    if label_free:
        B.check_iterable(data, "data")
        data = B.WithoutLabels(data)
        if calib_data is not None:
            B.check_iterable(calib_data, "calib_data")
            calib_data = B.WithoutLabels(calib_data)
    x0, labelled = _peek(data, "data")
    if calib_data is not None:
        _peek(calib_data, "calib_data")
    m = get_method(method)
    name = method_name(method)
    seed_everything(seed)
    device = model_device(model)
    if example_inputs is None:
        example_inputs = x0
    example_inputs = example_inputs.to(device)
    shape = input_shape_of(example_inputs)
    if calib_images is not None:
        options["calib_images"] = calib_images
    if "train_images" not in options:  # how many distinct images CaP's steps re-use
        options["train_images"] = _count_images(data)
    if steps is not None:
        options["steps"] = steps
    config = CapConfig(seed=seed).replace(**options)
    if recipe not in (*RECIPES, "auto"):
        raise CaprojError(f"recipe must be one of {', '.join([*RECIPES, 'auto'])}, got "
                          f"{recipe!r}", param="recipe")
    ft = _finetune_config(finetune, seed, has_teacher=True)  # bad options fail before any work
    by_recipe = ft is not None and not isinstance(finetune, TrainConfig)
    was_training = model.training
    model.eval()  # compression reads the trained network as deployed; mode restored below
    uses_widths = getattr(m, "uses_widths", True)
    spec = None
    if target_latency is not None:
        spec = L.Spec(runtime, latency_batch, latency_threads, device.type).check()
    plan = Plan.of(model, shape, target_macs=target_macs, keep=keep, allocation=allocation,
                   channel_multiple=channel_multiple or CHANNEL_MULTIPLE,
                   stream_projection=stream_projection, widths=widths,
                   target_latency=target_latency, latency_spec=spec)
    t0 = time.perf_counter()
    calib = B.take(calib_data if calib_data is not None else data, config.calib_images, device)
    with torch.no_grad():  # a dict/tuple output without output_transform fails now, not later
        outputs_of(model.eval(), calib[0][:1], output_transform)
    if uses_widths:
        plan.resolve(model, calib)
    alloc_s = time.perf_counter() - t0
    before = {"macs_before": plan.mm.total, "params_before": metrics.count_params(model)}
    if uses_widths:
        log.info("%d sites; widths %s; predicted MACs %.2f M (%.3f of %.2f M)", len(plan.sites),
                 plan.widths, plan.predicted_macs() / 1e6, plan.predicted_macs() / plan.mm.total,
                 plan.mm.total / 1e6)
    original = None if eval_data is None else _evaluate_impl(
        model, eval_data, loss_fn=loss_fn, output_transform=output_transform,
        progress_bar=progress)  # once: accuracy before, and the recipe's test loss
    chosen: dict[str, Any] = {"recipe": recipe}
    if by_recipe and recipe == "auto":
        chosen = choose_recipe(model, calib_data if calib_data is not None else data,
                               eval_data, loss_fn=loss_fn, output_transform=output_transform,
                               test_loss=None if original is None else original["loss"])
        log.info("fine-tune recipe %s (%s)", chosen["recipe"], chosen.get("reason") or
                 f"training loss {chosen['train_loss']:.3f} = {chosen['ratio']:.2f} x the "
                 f"test loss; learn above {LEARN_RATIO}")
    base = RECIPES.get(chosen["recipe"], FINETUNE)
    if by_recipe and base is not FINETUNE:
        ft = _finetune_config(finetune, seed, has_teacher=True, base=base)
        if "kd" not in options:
            config = config.replace(kd=base.kd_weight)  # the recipe's distillation in CaP too
    cap_ck = ft_ck = None
    if state_path is not None:
        cap_ck = Checkpointer(f"{state_path}.cap-state.pt", {}, save_every, resume)
        ft_ck = Checkpointer(f"{state_path}.ft-state.pt",
                             {"plan": plan.describe(), "cap": config.as_dict(), "method": name,
                              "finetune": ft.as_dict() if ft else None}, save_every, resume)
    job = Job(model, plan, calib, data, config, loss_fn, output_transform, teacher, cap_ck,
              progress)
    rep: dict[str, Any] = {"method": name, **plan.describe(), "label_free": not labelled,
                           "allocation_seconds": alloc_s, **before}
    if by_recipe:
        rep["recipe"] = chosen
    if syn is not None:
        rep["data_free"] = {k: v for k, v in syn.report.items() if k != "batches"}
    if original is not None:
        rep["acc_before"] = original["acc"]
    t1 = time.perf_counter()
    small = m(job)
    rep.update(job.report)
    rep["compress_seconds"] = (time.perf_counter() - t1 + alloc_s
                               + job.report.get("cap_timings", {}).get("earlier_s", 0.0))
    if not isinstance(small, nn.Module):
        raise CaprojError(f"method {name!r} returned {type(small).__name__}, not an nn.Module",
                          param="method")
    small.eval()
    if config.match_scale:
        ratios = match_weight_scale(small, model)
        rep["match_scale"] = ratios
        if ratios:
            log.info("rescaled %d layers to the original weight size (ratios %.2f-%.2f)",
                     len(ratios), min(ratios.values()), max(ratios.values()))
    macs = metrics.count_macs(small, shape)
    if uses_widths and macs != plan.predicted_macs():
        raise CaprojError(f"internal error: MACs after surgery {macs} != predicted "
                          f"{plan.predicted_macs()} (method {name})")
    rep.update(macs_after=macs, params_after=metrics.count_params(small))
    if plan.latency is not None:  # what the user will get; optional: never loses the result
        try:
            rep["latency"] = L.report(model, small, shape, plan.latency,
                                      plan.widths)  # type: ignore[arg-type]
            log.info("latency (%s, batch %d): %.3f -> %.3f ms, %.2fx measured; predicted "
                     "%.3f ms (%+.1f %%)", runtime, latency_batch, rep["latency"]["original_ms"],
                     rep["latency"]["compressed_ms"], rep["latency"]["speedup"],
                     rep["latency"]["predicted_ms"], 100 * rep["latency"]["prediction_error"])
        except Exception as e:  # noqa: BLE001
            rep["latency_notes"] = [f"{runtime}: {str(e).strip()[:160] or type(e).__name__}"]
            log.warning("latency measurement failed: %s", rep["latency_notes"][0])
    log.info("%s: %.2f M -> %.2f M MACs (%.3f) in %.0f s", name, plan.mm.total / 1e6,
             macs / 1e6, macs / plan.mm.total, rep["compress_seconds"])
    if eval_data is not None:
        rep["acc_after_compress"] = _evaluate_impl(small, eval_data, loss_fn=loss_fn,
                                                   output_transform=output_transform,
                                                   progress_bar=progress)["acc"]
        log.info("after %s (no fine-tuning): %.2f %%", name, rep["acc_after_compress"])
    if ft is not None:
        t2 = time.perf_counter()
        kd_teacher = teacher if teacher is not None else model
        needs_teacher = ft.kd_weight > 0 or ft.feature_weight > 0 or not labelled
        rep["finetune"] = fit(small, data, ft, teacher=kd_teacher if needs_teacher else None,
                              eval_data=eval_data, loss_fn=loss_fn,
                              output_transform=output_transform, checkpoint=ft_ck,
                              progress_bar=progress)
        rep["finetune_seconds"] = time.perf_counter() - t2
        rep["finetune_config"] = ft.as_dict()
        if rep["finetune"] and "test_acc" in rep["finetune"][-1]:
            rep["acc_after_finetune"] = rep["finetune"][-1]["test_acc"]
        small.eval()
    for ck in (cap_ck, ft_ck):
        if ck is not None:
            ck.finish()
    model.train(was_training)
    rep["total_seconds"] = time.perf_counter() - t_start
    rep.update(run_record(seed), cap_config_requested=config.as_dict())
    return Result(small, list(plan.widths) if uses_widths and plan.widths else None, rep,
                  plan.sites)


def finetune(model: nn.Module, data: Iterable, *, epochs: int,
             teacher: nn.Module | None = None, eval_data: Iterable | None = None,
             loss_fn: LossFn | None = None, output_transform: OutputTransform | None = None,
             seed: int = 0, progress: bool = True, state_path: str | os.PathLike | None = None,
             resume: bool = False, save_every: int = SAVE_EVERY, **recipe: Any) -> list[dict]:
    """Fine-tune `model` in place on `data` for `epochs` passes with the measured recipe
    (`caproj.FINETUNE`: SGD nesterov, one-cycle peak lr 0.005, KD 0.5 from `teacher`; without a
    teacher plain cross-entropy), `**recipe` overriding any `caproj.TrainConfig` field.
    Returns one record per epoch (test accuracy too when `eval_data` is given); the model is
    left in eval mode."""
    if not isinstance(model, nn.Module):
        raise CaprojError(f"model must be an nn.Module, got {type(model).__name__}",
                          param="model")
    cfg = _finetune_config({"epochs": epochs, **recipe}, seed, teacher is not None)
    if cfg is None:
        return []
    if cfg.kd_weight > 0 and teacher is None:
        raise CaprojError("kd_weight > 0 needs a teacher model", param="teacher")
    ck = None
    if state_path is not None:
        ck = Checkpointer(f"{state_path}.ft-state.pt", {"finetune": cfg.as_dict()}, save_every,
                          resume)
    hist = fit(model, data, cfg, teacher=teacher, eval_data=eval_data, loss_fn=loss_fn,
               output_transform=output_transform, checkpoint=ck, progress_bar=progress)
    if ck is not None:
        ck.finish()
    model.eval()  # handed back ready for inference, as compress hands back its result
    return hist


def evaluate(model: nn.Module, data: Iterable, *, loss_fn: LossFn | None = None,
             output_transform: OutputTransform | None = None, max_batches: int | None = None,
             progress: bool = True) -> dict[str, float]:
    """{"acc": top-1 %, "loss": mean loss, "n": images} over labelled batches (x, y)."""
    return _evaluate_impl(model, data, loss_fn=loss_fn, output_transform=output_transform,
                          max_batches=max_batches, progress_bar=progress)


def save(model: nn.Module, path: str | os.PathLike, **meta: Any) -> None:
    """Write `model`'s weights and `meta` (JSON-able: e.g. arch="tv:resnet18", input_shape)
    atomically: a caproj checkpoint (.pt; loads with weights_only=True), or safetensors when
    `path` ends in .safetensors. No pickled modules: reload with `load(path, model=YourNet())`,
    or without `model` for caproj's zoo / tv: / timm: architectures named by `arch`."""
    if not isinstance(model, nn.Module):
        raise CaprojError(f"model must be an nn.Module, got {type(model).__name__}",
                          param="model")
    meta.setdefault("model_class", f"{type(model).__module__}.{type(model).__qualname__}")
    meta.setdefault("compressed", True)
    ck = make_checkpoint(model, meta.pop("arch", None), **meta)
    if str(path).endswith(".safetensors"):
        with atomic_path(path) as tmp:
            write_safetensors(ck["state_dict"],
                              tmp, {k: v for k, v in ck.items() if k != "state_dict"})
    else:
        atomic_save(ck, path)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """A model from `path` (caproj checkpoint, safetensors, or a plain state_dict), in eval
    mode. With `model` (a fresh instance of your own class), its layers are narrowed to the
    stored widths and the weights loaded into it; without, the architecture named in the
    checkpoint (`arch`: zoo, tv:, timm:) is rebuilt."""
    if model is None:
        m, _ = load_model(path)
        return m
    if not isinstance(model, nn.Module):
        raise CaprojError(f"model must be an nn.Module, got {type(model).__name__}",
                          param="model")
    sd = read_checkpoint(Path(path))["state_dict"]
    check_finite(sd, str(path))
    resize_to_state_dict(model, sd)
    check_state_dict(model, sd, type(model).__name__)
    model.load_state_dict(sd, strict=False)
    return model.eval()
