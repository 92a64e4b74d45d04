"""The stages of `caproj.compress`, each readable on its own, with typed intermediates:

    prepare_inputs -> plan_job -> resolve_settings (the preset, the budget) -> run_method
    -> post_process -> measure -> fine_tune

`compress` (caproj.api) strings them together; a user who wants to own the loop can call them
in turn (Torch-Pruning's style: the library decides, the user's code drives).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from caproj import batches as B
from caproj import dist, metrics
from caproj import latency as L
from caproj.cap import input_shape_of
from caproj.config import (
    CAP,
    CHANNEL_MULTIPLE,
    FINETUNE,
    LEARN_RATIO,
    PRESETS,
    CapConfig,
    JobFacts,
    Preset,
    TrainConfig,
    choose_preset,
)
from caproj.errors import CaprojError
from caproj.factored import Factored
from caproj.losses import LossFn, OutputTransform, outputs_of
from caproj.methods import CaPMethod, Job, Method, get_method, method_name, refuse_fixed
from caproj.plan import Plan
from caproj.resume import Checkpointer
from caproj.surgery import match_weight_scale, restore_pruned_form
from caproj.synth import synthesize
from caproj.train import evaluate as evaluate_model
from caproj.train import feature_layers_of, fit, model_device, planned_steps

log = logging.getLogger(__name__)
EVALUATIONS = 10  # fine-tuning over many short epochs (a small set) is evaluated this often


# ----------------------------------------------------------------------------- 1: inputs
@dataclass
class Inputs:
    """The job's data as the stages read it."""

    data: Iterable  # training batches (CaP's steps, Taylor scores, fine-tuning)
    calib_data: Iterable | None  # where calibration images come from (None: data)
    labelled: bool
    first: torch.Tensor  # the first batch's inputs
    images: int | None  # distinct training images, where the data says
    step_images: int  # images per training batch (the first batch's)
    steps_per_epoch: int | None  # batches per pass over data, where it says
    synthetic: dict[str, Any] | None = None  # the synthesis report (data-free)

    @property
    def epoch_images(self) -> int | None:
        return None if self.steps_per_epoch is None else self.steps_per_epoch * self.step_images


def peek(data: Iterable, name: str) -> tuple[torch.Tensor, bool]:
    """The first batch's inputs and whether it has labels."""
    B.check_iterable(data, name)
    for x, y in B.iterate(data):
        return x, y is not None
    raise CaprojError(f"{name} is empty: it yielded no batch", param=name)


def count_images(data: Iterable) -> int | None:
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


def prepare_inputs(model: nn.Module, data: Iterable | None, calib_data: Iterable | None, *,
                   synthetic: int | None, synth_options: Mapping[str, Any] | None,
                   example_inputs: torch.Tensor | None, label_free: bool, seed: int,
                   progress: bool, state_path: str | os.PathLike | None, resume: bool,
                   output_transform: OutputTransform | None,
                   batch_size: int = CAP.batch_size) -> Inputs:
    """Check the data, synthesise it (data-free), drop its labels (`label_free`)."""
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
        data = syn.batches(batch_size, train=True, seed=seed, device=dev)
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
    x0, labelled = peek(data, "data")
    if calib_data is not None:
        peek(calib_data, "calib_data")
    return Inputs(data, calib_data, labelled, x0, count_images(data), len(x0),
                  B.steps_per_pass(data),
                  None if syn is None else {k: v for k, v in syn.report.items()
                                            if k != "batches"})


# ----------------------------------------------------------------------------- 2: the fit
def measure_fit(model: nn.Module, train_data: Iterable, eval_data: Iterable | None, *,
                loss_fn: LossFn | None = None, output_transform: OutputTransform | None = None,
                max_batches: int = 16, test_loss: float | None = None) -> dict[str, Any]:
    """Whether `model` fits its training data: {"fits": bool | None, "train_loss",
    "test_loss", "ratio", "threshold"} (or a "reason" where it could not measure).

    The original's mean loss on up to `max_batches` batches of `train_data` (unaugmented
    training images, as a calibration set is) above `caproj.config.LEARN_RATIO` x its loss on
    `eval_data` means it does not fit: it was trained on other data or preprocessing, and its
    predictions would cap a student distilled from it (the "learn" preset). A heuristic
    measured on four starts (RESULTS.md). `test_loss`: already measured (not re-measured)."""
    if eval_data is None:
        return {"fits": None, "reason": "no eval_data to compare the training loss with"}
    if not peek(train_data, "train_data")[1]:
        return {"fits": None, "reason": "unlabelled training data"}
    kw: dict[str, Any] = {"loss_fn": loss_fn, "output_transform": output_transform,
                          "progress_bar": False}
    tr = evaluate_model(model, train_data, max_batches=max_batches, **kw)["loss"]
    te = evaluate_model(model, eval_data, **kw)["loss"] if test_loss is None else test_loss
    ratio = tr / te if te > 0 else math.inf
    learn = dist.any_rank(ratio > LEARN_RATIO)  # under torchrun every rank decides alike
    return {"fits": not learn, "train_loss": tr, "test_loss": te, "ratio": ratio,
            "threshold": LEARN_RATIO}


# ----------------------------------------------------------------------------- 3: the plan
@dataclass
class Where:
    """What is narrowed and how the budget is spread (compress's options; None: the
    preset's, else uniform and no stream projection)."""

    target_macs: float | None = None
    keep: float | None = None
    widths: list[int] | None = None
    target_latency: float | None = None
    allocation: str | None = None
    stream_projection: bool | None = None
    channel_multiple: int | None = None
    latency_spec: L.Spec | None = None

    def with_preset(self, preset: Preset) -> Where:
        """The preset's allocation and stream projection where the user set none; a preset's
        automatic widths spread a budget, so they yield to the user's keep or widths."""
        extra = dict(preset.compress)
        fixed = self.keep is not None or self.widths is not None
        return dataclasses.replace(
            self, allocation=self.allocation or ("uniform" if fixed else
                                                 extra.get("allocation", "uniform")),
            stream_projection=(self.stream_projection if self.stream_projection is not None
                               else extra.get("stream_projection", False)))


def plan_job(model: nn.Module, shape: tuple[int, ...], where: Where) -> Plan:
    """The sites and the budget (widths are chosen by `Plan.resolve`, on calibration data)."""
    return Plan.of(model, shape, target_macs=where.target_macs, keep=where.keep,
                   allocation=where.allocation or "uniform",
                   channel_multiple=where.channel_multiple or CHANNEL_MULTIPLE,
                   stream_projection=bool(where.stream_projection), widths=where.widths,
                   target_latency=where.target_latency, latency_spec=where.latency_spec)


def depth_of(plan: Plan) -> float | None:
    """The fraction of the MACs the job keeps, as far as known before widths are chosen."""
    if plan.target_macs is not None:
        return plan.target_macs
    if plan.widths is not None:
        return plan.predicted_macs() / plan.mm.total
    return None


# ----------------------------------------------------------------------------- 4: settings
@dataclass
class Settings:
    """Everything the job runs with, resolved once: the preset and why, the method, CaP's
    settings, the fine-tune recipe (None: none) and the training budget."""

    preset: Preset | None
    reason: str
    method: Method
    method_name: str
    cap: CapConfig
    finetune: TrainConfig | None
    budget: dict[str, Any] = field(default_factory=dict)
    overridden: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.preset.name if self.preset else None, "reason": self.reason,
                "overridden": self.overridden,
                **({"measured": self.preset.measured.row(), "job": self.preset.job}
                   if self.preset else {})}


def pick_preset(preset: str | Preset | None, facts: JobFacts,
                method: str | Method | None = None) -> tuple[Preset | None, str]:
    """`preset`: "auto" (the rules of `caproj.config.choose_preset`), a name, a Preset, or None
    (no preset: caproj's plain defaults). "auto" with a method other than CaP is None too: the
    presets are measured configurations of CaP."""
    if preset == "auto" and method is not None and method_name(method) != "cap":
        return None, (f"method {method_name(method)!r} given: the presets are measured "
                      f"configurations of CaP; caproj's plain defaults")
    if preset is None:
        return None, "preset=None: caproj's plain defaults"
    if isinstance(preset, Preset):
        return preset, "given"
    if preset == "auto":
        name, why = choose_preset(facts)
        return PRESETS[name], why
    if preset not in PRESETS:
        raise CaprojError(f"unknown preset {preset!r}; choose from auto, "
                          f"{', '.join(PRESETS)}", param="preset")
    return PRESETS[preset], "chosen by name"


def finetune_epochs_of(finetune: int | Mapping[str, Any] | TrainConfig | None) -> float:
    if finetune is None or finetune is False:
        return 0
    if isinstance(finetune, TrainConfig):
        return finetune.epochs
    if isinstance(finetune, bool) or not isinstance(finetune, (int, Mapping)):
        raise CaprojError("finetune must be a number of epochs, a dict of recipe options or a "
                          "TrainConfig", param="finetune")
    epochs = finetune if isinstance(finetune, int) else finetune.get("epochs", FINETUNE.epochs)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise CaprojError(f"finetune epochs must be an integer >= 0, got {epochs!r}",
                          param="finetune")
    if isinstance(finetune, Mapping):
        FINETUNE.replace(**finetune)  # unknown or invalid recipe options fail before any work
    return epochs


def cap_steps_of(method: Method, cfg: CapConfig) -> int:
    """CaP optimisation steps a method runs (0 for methods without them)."""
    if isinstance(method, CaPMethod):
        return int(method.overrides.get("steps", cfg.steps))
    return 0


def finetune_for(images: int, ft: TrainConfig, epoch_images: int) -> TrainConfig:
    """A fine-tune recipe consuming `images` training images: whole epochs, capped in steps
    (so the one-cycle schedule spans exactly the images given); a `max_steps` the recipe
    already holds (the user's) stays a cap."""
    if images <= 0:
        return ft.replace(epochs=0, max_steps=None)
    steps = user_cap(max(1, images // ft.batch_size), ft)
    return ft.replace(epochs=max(1, math.ceil(images / epoch_images)), max_steps=steps)


def user_cap(steps: int, ft: TrainConfig) -> int:
    """`steps`, or the recipe's own `max_steps` where that is lower."""
    return steps if ft.max_steps is None else min(steps, ft.max_steps)


def split_budget(total: int, cap_images: int, ft: TrainConfig, inputs: Inputs
                 ) -> tuple[TrainConfig | None, dict[str, Any]]:
    """The fine-tuning that spends what CaP's steps leave of `total` training images."""
    rest = total - cap_images
    info: dict[str, Any] = {"images": total, "cap_images": cap_images,
                            "finetune_images": max(rest, 0)}
    if rest <= 0:
        return None, info
    epoch = inputs.epoch_images
    ft = ft.replace(batch_size=inputs.step_images)
    if epoch is None:  # a stream or generator: one pass, capped in steps
        info["note"] = "the data does not say its length: one pass, capped in steps"
        return ft.replace(epochs=1, max_steps=user_cap(max(1, rest // ft.batch_size), ft)), \
            info
    if rest % epoch == 0:
        return ft.replace(epochs=rest // epoch, max_steps=ft.max_steps), info
    return finetune_for(rest, ft, epoch), info


def resolve_settings(*, preset: str | Preset | None, facts: JobFacts, method: str | Method | None,
                     options: dict[str, Any], finetune: int | Mapping[str, Any] | TrainConfig
                     | None, budget_images: int | None, inputs: Inputs,
                     seed: int) -> Settings:
    """The preset for the job, overridden by the user's options; the budget split between
    CaP's steps and the fine-tuning. `options`: CapConfig fields the user gave."""
    chosen, reason = pick_preset(preset, facts, method)
    p_cap = dict(chosen.cap) if chosen else {}
    p_ft = dict(chosen.finetune) if chosen else {}
    m = get_method(method if method is not None else (chosen.method if chosen else "cap"))
    refuse_fixed(m, options)
    overridden = sorted({k for k in options if k in p_cap}
                        | ({"method"} if chosen and method is not None
                           and method_name(method) != chosen.method else set()))
    cap = CapConfig(seed=seed).replace(**{**p_cap, **options})
    user_ft: dict[str, Any] = {}
    if isinstance(finetune, Mapping):
        user_ft = dict(finetune)
        overridden = sorted({*overridden, *(k for k in user_ft if k in p_ft)})
    implied = getattr(m, "finetune", None)  # what the method implies (resrep: factored)
    implied = dict(implied) if isinstance(implied, Mapping) else {}
    if isinstance(finetune, TrainConfig):  # used as given (but for what the method implies):
        # no preset recipe, no budget split
        return Settings(chosen, reason, m, method_name(m), cap, finetune.replace(**implied),
                        {"note": "a TrainConfig is used as given"}, overridden)
    epochs = finetune_epochs_of(finetune)
    ft = FINETUNE.replace(**{"seed": seed, **p_ft, **implied, **user_ft, "epochs": epochs})
    steps = cap_steps_of(m, cap)
    # the share of the budget reserved for CaP's steps: the steps the user asked for, else
    # CaP's default (a preset without steps spends it fine-tuning)
    default_cap = options.get("steps", CAP.steps if chosen is None or chosen.trains else 0
                              ) * cap.batch_size
    if budget_images is not None:
        if isinstance(budget_images, bool) or not isinstance(budget_images, int) \
                or budget_images < 0:
            raise CaprojError(f"budget_images must be an integer >= 0, got {budget_images!r}",
                              param="budget_images")
        if budget_images < steps * cap.batch_size:
            raise CaprojError(f"budget_images {budget_images} is less than the "
                              f"{steps * cap.batch_size} images CaP's {steps} steps consume; "
                              f"give more, or steps=0", param="budget_images")
        total = budget_images
    elif chosen is None:  # no preset: the epochs as given, CaP's steps as set
        total = None
    elif inputs.epoch_images is not None or epochs == 0:
        total = default_cap + epochs * (inputs.epoch_images or 0)
    else:  # epochs of data of unknown length: the epochs as given
        total = None
    if total is None:
        budget = {"note": "fine-tuning runs the epochs given" + (
            "" if chosen is None else " (the data does not say its length)")}
        tcfg = ft if epochs > 0 else None
    else:
        tcfg, budget = split_budget(total, steps * cap.batch_size, ft, inputs)
    return Settings(chosen, reason, m, method_name(m), cap, tcfg, budget, overridden)


# ----------------------------------------------------------------------------- 5: run
def run_method(job: Job, settings: Settings) -> nn.Module:
    small = settings.method(job)
    if not isinstance(small, nn.Module):
        raise CaprojError(f"method {settings.method_name!r} returned {type(small).__name__}, "
                          f"not an nn.Module", param="method")
    return small.eval()


def post_process(small: nn.Module, model: nn.Module, cfg: CapConfig,
                 finetune: TrainConfig | None = None, job: Job | None = None
                 ) -> dict[str, Any]:
    """What runs after any method: `pruned_form` (a selection's kept channels get their
    original filters and BNs back, `caproj.surgery.restore_pruned_form`), then `match_scale`
    (each layer that feeds a BN rescaled to the original layer's weight size, same outputs),
    both unless the fine-tuning freezes BN: a frozen BN divides by its stored statistics, so a
    layer shrunk by r steps r^2 times further relative to its weights (a digits CNN
    fine-tuned so fell from 96 to 12 %), and pruning's form, whose BN statistics are
    re-estimated on the narrowed inputs, fell the same way (96.7 to 11 % in 20 steps)."""
    rep: dict[str, Any] = {}
    frozen = finetune is not None and finetune.freeze_bn and finetune.epochs > 0
    if cfg.pruned_form and frozen:  # its BNs put channels back at their scale in train mode
        log.warning("pruned_form skipped: the fine-tuning freezes BN (freeze_bn), and pruning's "
                    "form relies on BN in training mode to restore each channel's scale")
        rep["pruned_form_skipped"] = "freeze_bn"
    elif cfg.pruned_form and job is not None and job.projections is not None:
        rep["pruned_form"] = restore_pruned_form(small, model, job.sites, job.projections,
                                                 job.calib)
    if not cfg.match_scale:
        return rep
    if frozen:
        log.warning("match_scale skipped: the fine-tuning freezes BN (freeze_bn), and behind a "
                    "frozen BN rescaling a layer changes its step size")
        return rep | {"match_scale_skipped": "freeze_bn"}
    ratios = match_weight_scale(small, model)
    if ratios:
        log.info("rescaled %d layers to the original weight size (ratios %.2f-%.2f)",
                 len(ratios), min(ratios.values()), max(ratios.values()))
    return rep | {"match_scale": ratios}


# ----------------------------------------------------------------------------- 6: measure
def measure(model: nn.Module, small: nn.Module, plan: Plan, shape: tuple[int, ...],
            eval_data: Iterable | None, *, name: str, uses_widths: bool,
            loss_fn: LossFn | None, output_transform: OutputTransform | None,
            progress: bool) -> dict[str, Any]:
    """MACs and params after, the measured latency (latency budgets), accuracy after."""
    macs = metrics.count_macs(small, shape)
    if uses_widths and macs != plan.predicted_macs():
        raise CaprojError(f"internal error: MACs after surgery {macs} != predicted "
                          f"{plan.predicted_macs()} (method {name})")
    rep: dict[str, Any] = {"macs_after": macs, "params_after": metrics.count_params(small)}
    if plan.latency is not None:  # what the user will get; optional: never loses the result
        try:
            rep["latency"] = L.report(model, small, shape, plan.latency,
                                      plan.widths)  # type: ignore[arg-type]
            lat = rep["latency"]
            log.info("latency (%s, batch %d): %.3f -> %.3f ms, %.2fx measured; predicted "
                     "%.3f ms (%+.1f %%)", plan.latency.spec.runtime, plan.latency.spec.batch,
                     lat["original_ms"], lat["compressed_ms"], lat["speedup"],
                     lat["predicted_ms"], 100 * lat["prediction_error"])
        except Exception as e:  # noqa: BLE001
            rep["latency_notes"] = [f"{plan.latency.spec.runtime}: "
                                    f"{str(e).strip()[:160] or type(e).__name__}"]
            log.warning("latency measurement failed: %s", rep["latency_notes"][0])
    log.info("%s: %.2f M -> %.2f M MACs (%.3f)", name, plan.mm.total / 1e6, macs / 1e6,
             macs / plan.mm.total)
    if eval_data is not None:
        rep["acc_after_compress"] = evaluate_model(small, eval_data, loss_fn=loss_fn,
                                                   output_transform=output_transform,
                                                   progress_bar=progress)["acc"]
        log.info("after %s (no fine-tuning): %.2f %%", name, rep["acc_after_compress"])
    return rep


# ----------------------------------------------------------------------------- 7: fine-tune
def fine_tune(small: nn.Module, model: nn.Module, inputs: Inputs, ft: TrainConfig, *,
              teacher: nn.Module | None, eval_data: Iterable | None, loss_fn: LossFn | None,
              output_transform: OutputTransform | None, checkpoint: Checkpointer | None,
              progress: bool, job: Job | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune the compressed network in place (distilling from `teacher`, default the
    original, where the recipe or missing labels ask for it); with `ft.factored`, the original
    with compactors narrowing to `job`'s projections instead, merged at the end. Returns the
    fine-tuned network and its report."""
    t0 = time.perf_counter()
    kd_teacher = teacher if teacher is not None else model
    net = factored_start(model, inputs, ft, job) if ft.factored else small
    if ft.feature_weight > 0 and not feature_layers_of(net, kd_teacher):
        log.warning("feature_weight %g: no layer kept its output and changed its input; "
                    "fine-tuning without the reconstruction term", ft.feature_weight)
        ft = ft.replace(feature_weight=0.0)
    needs_teacher = ft.kd_weight > 0 or ft.feature_weight > 0 or not inputs.labelled
    hist = fit(net, inputs.data, ft, teacher=kd_teacher if needs_teacher else None,
               eval_data=eval_data, loss_fn=loss_fn, output_transform=output_transform,
               checkpoint=checkpoint, progress_bar=progress,
               eval_every=max(1, ft.epochs // EVALUATIONS))
    if isinstance(net, Factored):
        small = net.merge()
        log.info("factored fine-tuning: merged after %d steps", int(net.step))
    small.eval()
    rep: dict[str, Any] = {"finetune": hist, "finetune_seconds": time.perf_counter() - t0,
                           "finetune_config": ft.as_dict()}
    if hist and "test_acc" in hist[-1]:
        rep["acc_after_finetune"] = hist[-1]["test_acc"]
    return small, rep


def factored_start(model: nn.Module, inputs: Inputs, ft: TrainConfig, job: Job | None
                   ) -> Factored:
    """The original with a compactor per site, narrowing over `ft.factored_ramp` of the
    fine-tune's steps (as `fit` will count them) to the projections the method found."""
    if job is None or job.projections is None:
        raise CaprojError("factored fine-tuning narrows to a method's projections: use cap, "
                          "cp, pca or a channel selection (l1, fpgm, taylor), or leave "
                          "factored off", param="factored")
    _, total = planned_steps(inputs.data, ft)
    ramp = max(1, round(ft.factored_ramp * total))
    log.info("factored fine-tuning: narrowing over %d of %d steps", ramp, total)
    return Factored(model, job.sites, job.projections, ramp).to(model_device(model))


def check_forward(model: nn.Module, calib: list[torch.Tensor],
                  output_transform: OutputTransform | None) -> None:
    """A dict/tuple output without output_transform fails now, not after minutes of work."""
    with torch.no_grad():
        outputs_of(model.eval(), calib[0][:1], output_transform)
