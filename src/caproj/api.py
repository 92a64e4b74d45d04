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

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from caproj import batches as B
from caproj import latency as L
from caproj import metrics
from caproj import stages as S
from caproj.allocate import Refit
from caproj.cap import input_shape_of
from caproj.config import FINETUNE, SAVE_EVERY, CapConfig, JobFacts, Preset, TrainConfig
from caproj.errors import CaprojError
from caproj.losses import LossFn, OutputTransform
from caproj.methods import Job, Method
from caproj.models import (
    check_finite,
    check_state_dict,
    load_model,
    make_checkpoint,
    read_checkpoint,
    write_safetensors,
)
from caproj.resume import Checkpointer
from caproj.sites import traced_on
from caproj.stages import measure_fit
from caproj.surgery import resize_to_state_dict
from caproj.synth import synthesize
from caproj.train import evaluate as _evaluate_impl
from caproj.train import fit, model_device
from caproj.utils import atomic_path, atomic_save, run_record, seed_everything, unwrap

log = logging.getLogger(__name__)

__all__ = ["Report", "Result", "compress", "measure_fit", "finetune", "evaluate", "save",
           "load", "synthesize"]


@dataclass
class Result:
    """What `compress` returns. `model` is a plain nn.Module, physically narrower than the
    input model (which is left untouched); `widths` the channels kept per site; `report` a
    JSON-able dict (`Report`: one name per quantity); `sites` the compressed sites;
    `projections` each site's projection (c x width) where the method has one (what
    `caproj.Factored` narrows to when you own the fine-tuning loop)."""

    model: nn.Module
    widths: list[int] | None
    report: dict[str, Any] = field(default_factory=dict)
    sites: list[Any] = field(default_factory=list)
    projections: list[torch.Tensor] | None = None


class Report(TypedDict, total=False):
    """The keys of `Result.report` (each quantity under one name)."""

    method: str
    preset: dict[str, Any]  # name, reason, the measured row, the options that overrode it
    budget: dict[str, Any]  # training images: total, CaP's steps', fine-tuning's
    label_free: bool
    data_free: dict[str, Any]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    acc_before: float  # top-1 % of the original on eval_data
    acc_after_compress: float  # ... of the compressed network before fine-tuning
    acc_after_finetune: float
    allocation_seconds: float
    compress_seconds: float
    finetune_seconds: float
    total_seconds: float
    cap_config: dict[str, Any]  # CaP's settings as run (rates resolved)
    cap_config_requested: dict[str, Any]
    cap_history: list[dict[str, Any]]
    finetune: list[dict[str, Any]]  # one record per fine-tune epoch
    finetune_config: dict[str, Any]
    match_scale: dict[str, float]  # each rescaled layer's size ratio before rescaling
    match_scale_skipped: str  # why match_scale did not run ("freeze_bn")
    pruned_form: list[str]  # producers given their original filters and BNs back
    latency: dict[str, Any]
    fit: dict[str, Any]  # whether the original fits its training data (measure_fit)


def compress(model: nn.Module, data: Iterable | None = None, *, target_macs: float | None = None,
             keep: float | None = None, preset: str | Preset | None = "auto",
             method: str | Method | None = None, finetune: int | Mapping[str, Any] | TrainConfig
             | None = None, budget_images: int | None = None,
             example_inputs: torch.Tensor | None = None, calib_images: int | None = None,
             steps: int | None = None, loss_fn: LossFn | None = None,
             teacher: nn.Module | None = None, seed: int = 0, progress: bool = True,
             calib_data: Iterable | None = None, eval_data: Iterable | None = None,
             output_transform: OutputTransform | None = None,
             stream_projection: bool | None = None, allocation: str | None = None,
             channel_multiple: int | None = None, widths: list[int] | None = None,
             label_free: bool = False, target_latency: float | None = None,
             runtime: str = "eager", latency_batch: int = 1,
             latency_threads: int | None = None, synthetic: int | None = None,
             synth_options: Mapping[str, Any] | None = None,
             state_path: str | os.PathLike | None = None, resume: bool = False,
             save_every: int = SAVE_EVERY, input_key: str | None = None,
             target_key: str | None = None, **options: Any) -> Result:
    """Compress `model` (left untouched) to `target_macs` (fraction of its MACs; default 0.5),
    `keep` (fraction of channels per site) or `target_latency` (fraction of its measured
    latency), optionally fine-tune, and report.

    preset: "auto" (default: the measured configuration for this job, `caproj.PRESETS`, chosen
        by `caproj.config.choose_preset` from the target's depth, the fine-tune budget, labels,
        the number of images, whether the original fits the data, a latency target), a
        preset's name, or None (caproj's plain defaults, epochs as given). Every option you
        pass overrides the preset's; the report's "preset" says which was used and why.
    method: a registered name (`caproj.METHODS`) or a plug-in; default: the preset's.
    finetune: epochs (int), a dict of `caproj.TrainConfig` fields, or a TrainConfig (used as
        given). budget_images: the training budget as a whole (CaP's steps x batch + the
        fine-tuning's images); by default CaP's 600 x 128 plus the fine-tune epochs. A preset
        without CaP steps spends CaP's share fine-tuning (distilling, without labels).
    model: an nn.Module, also inside torch.compile / DataParallel / DDP (unwrapped).
    data: re-iterable batches (x, y) / (x,) / x / dicts ("pixel_values"/"labels", "image"/
        "label", or `input_key` / `target_key`). calib_data: where calibration images come
        from (default: data). eval_data: labelled batches; the report then holds top-1 before
        and after each stage. label_free: ignore the labels data may carry.
    synthetic: data-free: synthesise this many images from the model's BatchNorm statistics
        instead of `data` (`caproj.synthesize`; needs `example_inputs`; `synth_options`:
        `caproj.SynthConfig` fields), cached for the next job.
    example_inputs: for tracing and MACs (default: the first batch's inputs).
    calib_images, steps, **options: CaP settings (`caproj.CapConfig` fields).
    loss_fn(outputs, targets): replaces cross-entropy; output_transform(model output) ->
        logits; teacher: distil from it (default: model).
    stream_projection, allocation ("uniform" | "auto"), channel_multiple, widths: what is
        narrowed and how the budget is spread (default: the preset's, else uniform).
    target_latency, runtime ("eager" | "inductor" | "onnxruntime"), latency_batch,
        latency_threads: budget the latency the compressed model will have there
        (`caproj.latency`); the report's "latency" holds it measured.
    state_path / resume / save_every: resumable state, `<state_path>.cap-state.pt` and
        `.ft-state.pt`, removed when the job finishes.
    """
    t_start = time.perf_counter()
    model = _module(model)
    data, calib_data, eval_data = (B.keyed(d, input_key, target_key)
                                   for d in (data, calib_data, eval_data))
    inputs = S.prepare_inputs(model, data, calib_data, synthetic=synthetic,
                              synth_options=synth_options, example_inputs=example_inputs,
                              label_free=label_free, seed=seed, progress=progress,
                              state_path=state_path, resume=resume,
                              output_transform=output_transform,
                              batch_size=options.get("batch_size", CapConfig.batch_size))
    options = _cap_options(options, calib_images, steps, inputs)
    seed_everything(seed)
    device = model_device(model)
    example = (example_inputs if example_inputs is not None else inputs.first).to(device)
    shape = input_shape_of(example)
    where = S.Where(target_macs, keep, widths, target_latency, allocation, stream_projection,
                    channel_multiple, None if target_latency is None else
                    L.Spec(runtime, latency_batch, latency_threads, device.type).check())
    S.finetune_epochs_of(finetune)  # bad options fail before any work
    CapConfig(seed=seed).replace(**options)
    was_training = model.training
    model.eval()  # compression reads the trained network as deployed; mode restored below
    eval_kw: dict[str, Any] = {"loss_fn": loss_fn, "output_transform": output_transform}
    original = None if eval_data is None else _evaluate_impl(model, eval_data, **eval_kw,
                                                             progress_bar=progress)
    with traced_on(example):  # forwards that branch on their input are traced on it
        job, settings, rep, ft_ck = _plan_and_settle(
            model, inputs, shape, where, preset=preset, method=method, options=options,
            finetune=finetune, budget_images=budget_images, seed=seed, original=original,
            eval_data=eval_data, eval_kw=eval_kw, teacher=teacher, progress=progress,
            state=(state_path, resume, save_every))
        small = _run_and_measure(model, job, settings, rep, shape, eval_data, eval_kw, progress)
    if settings.finetune is not None:
        small, ft_rep = S.fine_tune(small, model, inputs, settings.finetune, teacher=teacher,
                                    eval_data=eval_data, checkpoint=ft_ck, progress=progress,
                                    job=job, **eval_kw)
        rep.update(ft_rep)
    for ck in (job.checkpoint, ft_ck):
        if ck is not None:
            ck.finish()
    model.train(was_training)
    rep["total_seconds"] = time.perf_counter() - t_start
    rep.update(run_record(seed), cap_config_requested=job.config.as_dict())
    uses_widths = getattr(settings.method, "uses_widths", True)
    return Result(small, list(job.plan.widths) if uses_widths and job.plan.widths else None,
                  rep, job.plan.sites, job.projections)


def _run_and_measure(model: nn.Module, job: Job, settings: S.Settings, rep: dict[str, Any],
                     shape: tuple[int, ...], eval_data: Iterable | None,
                     eval_kw: dict[str, Any], progress: bool) -> nn.Module:
    """The method's run on its settled job, its post-processing (pruning's form, rescaling)
    and the compressed network measured against the original; the report grows in `rep`."""
    t1 = time.perf_counter()
    small = S.run_method(job, settings)
    rep.update(job.report)
    rep["compress_seconds"] = (time.perf_counter() - t1 + rep["allocation_seconds"]
                               + job.report.get("cap_timings", {}).get("earlier_s", 0.0))
    rep.update(S.post_process(small, model, job.config, settings.finetune, job))
    rep.update(S.measure(model, small, job.plan, shape, eval_data, name=settings.method_name,
                         progress=progress,
                         uses_widths=getattr(settings.method, "uses_widths", True), **eval_kw))
    return small


def _cap_options(options: dict[str, Any], calib_images: int | None, steps: int | None,
                 inputs: S.Inputs) -> dict[str, Any]:
    """The CaP settings the user gave (compress's own arguments folded in), plus how many
    distinct images CaP's steps re-use (the small-set rates read it)."""
    options = dict(options)
    if calib_images is not None:
        options["calib_images"] = calib_images
    if steps is not None:
        options["steps"] = steps
    options.setdefault("train_images", inputs.images)
    return options


def _plan_and_settle(model: nn.Module, inputs: S.Inputs, shape: tuple[int, ...],
                     where: S.Where, *, preset: str | Preset | None, method: str | Method | None,
                     options: dict[str, Any], finetune: Any, budget_images: int | None,
                     seed: int, original: dict[str, float] | None, eval_data: Iterable | None,
                     eval_kw: dict[str, Any], teacher: nn.Module | None, progress: bool,
                     state: tuple[Any, bool, int]
                     ) -> tuple[Job, S.Settings, dict[str, Any], Checkpointer | None]:
    """Plan the sites, choose the preset (its rules read the plan's depth and, with labels
    and a fine-tune budget, whether the original fits the data), resolve the settings and
    the widths: the job the method runs."""
    t0 = time.perf_counter()
    facts = JobFacts(None, S.finetune_epochs_of(finetune), inputs.labelled, inputs.images,
                     synthetic=inputs.synthetic is not None,
                     target_latency=where.target_latency is not None,
                     budget_images=budget_images)
    first, _ = S.pick_preset(preset, facts, method)
    where = where.with_preset(first) if first is not None else where
    plan = S.plan_job(model, shape, where)
    calib_cfg = CapConfig(seed=seed).replace(**options)
    calib = B.take(inputs.calib_data if inputs.calib_data is not None else inputs.data,
                   calib_cfg.calib_images, model_device(model))
    S.check_forward(model, calib, eval_kw["output_transform"])
    calib = B.fit_chunks(model, calib)
    fit_report = None
    if preset == "auto" and inputs.labelled and facts.finetune_epochs > 0:
        fit_report = S.measure_fit(model, inputs.calib_data if inputs.calib_data is not None
                                   else inputs.data, eval_data, **eval_kw,
                                   test_loss=None if original is None else original["loss"])
    facts = dataclasses.replace(facts, depth=S.depth_of(plan),
                                fits=None if fit_report is None else fit_report["fits"])
    settings = S.resolve_settings(preset=preset, facts=facts, method=method, options=options,
                                  finetune=finetune, budget_images=budget_images,
                                  inputs=inputs, seed=seed)
    if settings.preset is not None and settings.preset.compress != getattr(first, "compress",
                                                                           ()):
        plan = S.plan_job(model, shape, where.with_preset(settings.preset))
    if getattr(settings.method, "uses_widths", True):
        plan.resolve(model, calib, Refit.of(settings.cap), eval_kw["output_transform"])
        log.info("%d sites; widths %s; predicted MACs %.2f M (%.3f of %.2f M)",
                 len(plan.sites), plan.widths, plan.predicted_macs() / 1e6,
                 plan.predicted_macs() / plan.mm.total, plan.mm.total / 1e6)
    log.info("preset %s (%s)", settings.preset.name if settings.preset else "none",
             settings.reason)
    cap_ck, ft_ck = _checkpoints(state, plan, settings)
    job = Job(model, plan, calib, inputs.data, settings.cap, eval_kw["loss_fn"],
              eval_kw["output_transform"], teacher, cap_ck, progress)
    rep: dict[str, Any] = {"method": settings.method_name, "preset": settings.describe(),
                           "budget": settings.budget, **plan.describe(),
                           "label_free": not inputs.labelled,
                           "allocation_seconds": time.perf_counter() - t0,
                           "macs_before": plan.mm.total,
                           "params_before": metrics.count_params(model)}
    if fit_report is not None:
        rep["fit"] = fit_report
    if inputs.synthetic is not None:
        rep["data_free"] = inputs.synthetic
    if original is not None:
        rep["acc_before"] = original["acc"]
    return job, settings, rep, ft_ck


def _checkpoints(state: tuple[Any, bool, int], plan: Any, settings: S.Settings
                 ) -> tuple[Checkpointer | None, Checkpointer | None]:
    """Resumable state of CaP's steps and of the fine-tuning (None without a state path)."""
    state_path, resume, save_every = state
    if state_path is None:
        return None, None
    ft = settings.finetune.as_dict() if settings.finetune else None
    return (Checkpointer(f"{state_path}.cap-state.pt", {}, save_every, resume),
            Checkpointer(f"{state_path}.ft-state.pt",
                         {"plan": plan.describe(), "cap": settings.cap.as_dict(),
                          "method": settings.method_name, "finetune": ft}, save_every, resume))


def finetune(model: nn.Module, data: Iterable, *, epochs: int,
             teacher: nn.Module | None = None, eval_data: Iterable | None = None,
             loss_fn: LossFn | None = None, output_transform: OutputTransform | None = None,
             seed: int = 0, progress: bool = True, state_path: str | os.PathLike | None = None,
             resume: bool = False, save_every: int = SAVE_EVERY, input_key: str | None = None,
             target_key: str | None = None, holdout: Iterable | None = None,
             **recipe: Any) -> list[dict]:
    """Fine-tune `model` in place on `data` for `epochs` passes with the measured recipe
    (`caproj.FINETUNE`: SGD nesterov, one-cycle peak lr 0.005, KD 0.5 from `teacher`; without a
    teacher plain cross-entropy), `**recipe` overriding any `caproj.TrainConfig` field.
    Returns one record per epoch (test accuracy too when `eval_data` is given); the model is
    left in eval mode. Models, data and keys as `compress` takes them. `holdout`: batches
    kept out of `data` (a slice of a few hundred calibration images, say); the weights that
    distil best onto them (the start's included) are kept, so fine-tuning never returns a
    network worse on them than the one it was given."""
    model = _module(model)
    data, eval_data = B.keyed(data, input_key, target_key), \
        B.keyed(eval_data, input_key, target_key)
    holdout = B.keyed(holdout, input_key, target_key)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise CaprojError(f"epochs must be an integer >= 0, got {epochs!r}", param="epochs")
    cfg = FINETUNE.replace(**{"seed": seed, **({} if teacher is not None else
                                               {"kd_weight": 0.0}), **recipe, "epochs": epochs})
    if cfg.epochs == 0:
        return []
    if cfg.factored:
        raise CaprojError("factored fine-tuning starts from the original network: "
                          "compress(model, data, finetune={'factored': True, ...}), or "
                          "caproj.Factored(original, res.sites, res.projections, ramp_steps) "
                          "in your own loop", param="factored")
    if cfg.kd_weight > 0 and teacher is None:
        raise CaprojError("kd_weight > 0 needs a teacher model", param="teacher")
    ck = None
    if state_path is not None:
        ck = Checkpointer(f"{state_path}.ft-state.pt", {"finetune": cfg.as_dict()}, save_every,
                          resume)
    hist = fit(model, data, cfg, teacher=teacher, eval_data=eval_data, loss_fn=loss_fn,
               output_transform=output_transform, checkpoint=ck, progress_bar=progress,
               holdout=holdout)
    if ck is not None:
        ck.finish()
    model.eval()  # handed back ready for inference, as compress hands back its result
    return hist


def evaluate(model: nn.Module, data: Iterable, *, loss_fn: LossFn | None = None,
             output_transform: OutputTransform | None = None, max_batches: int | None = None,
             progress: bool = True, input_key: str | None = None,
             target_key: str | None = None) -> dict[str, float]:
    """{"acc": top-1 %, "loss": mean loss, "n": images} over labelled batches (x, y), or dicts
    (`input_key` / `target_key`); one pass, so a generator will do."""
    return _evaluate_impl(_module(model), B.keyed(data, input_key, target_key),
                          loss_fn=loss_fn, output_transform=output_transform,
                          max_batches=max_batches, progress_bar=progress)


def _module(model: Any) -> nn.Module:
    """The user's model as a plain module (torch.compile / DataParallel / DDP unwrapped)."""
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise CaprojError(f"model must be an nn.Module, got {type(model).__name__}",
                          param="model")
    return model


def save(model: nn.Module, path: str | os.PathLike, **meta: Any) -> None:
    """Write `model`'s weights and `meta` (JSON-able: e.g. arch="tv:resnet18", input_shape)
    atomically: a caproj checkpoint (.pt; loads with weights_only=True), or safetensors when
    `path` ends in .safetensors. No pickled modules: reload with `load(path, model=YourNet())`,
    or without `model` for caproj's zoo / tv: / timm: architectures named by `arch`."""
    model = _module(model)
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
