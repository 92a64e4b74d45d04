"""Cascaded Projection (Minnehan & Savakis, CVPR 2019), all sites at once.

Stages (each measured in benchmarks/; see RESULTS.md for what each contributes):
1. calibrate: streamed statistics of every site on calibration images; (automatic widths);
   P initialised from `select` (channel selection, orthonormal) or `pca`;
   cascaded closed-form least squares of each consumer (every consumer of a residual
   stream too) - its input taken from the *compressed* prefix, its target the original
   consumer output - in execution order (caproj.refit);
2. optimise: SGD-style (Adam) steps on proxies of P retracted by QR, and optionally the
   compressed weights (caproj.capopt), with the mixture loss (caproj.losses)
       (1 - kd) CE(labels) + kd KD(original logits) + λ · mean_i ||ŷ_i - y_i||² / ||y_i||²
   where y_i is site i's consumer output in the original network and ŷ_i in the compressed
   network fed by its own (cascaded) outputs. Odd and even sites are updated alternately.
   Batches without labels drop the CE term (distillation + reconstruction: label-free).
3. finalize: surgery into plain narrower modules, fresh BNs re-estimated on calibration data.

Staged use, for people who own their loop:

    cap = caproj.CaP(model, example_inputs, target_macs=0.5, steps=600)
    cap.calibrate(loader)          # any iterable of batches; the first calib_images images
    cap.optimise(loader)           # config.steps steps (batches regrouped to batch_size)
    small = cap.finalize()         # a plain, physically narrower nn.Module
    torch.save(cap.state_dict(), "cap-state.pt")   # resumable: load_state_dict, optimise

The settings are a frozen `CapConfig`, resolved once (learning rates depend on whether a
residual stream is narrowed) when the widths are known: what the optimisation reads cannot
drift from what was configured and recorded.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from caproj import batches as B
from caproj import dist, projection, refit, surgery
from caproj.allocate import Refit
from caproj.capopt import MixtureLoss, ProjectionOptimiser, run_steps
from caproj.config import CapConfig
from caproj.errors import CaprojError
from caproj.losses import LossFn, OutputTransform
from caproj.plan import Plan
from caproj.resume import Checkpointer, rng_state, set_rng_state
from caproj.sites import Site
from caproj.train import model_device
from caproj.utils import steady_allocator, unwrap

log = logging.getLogger(__name__)
STATE_FORMAT = 3


def input_shape_of(example_inputs: torch.Tensor | tuple) -> tuple[int, ...]:
    """(C, H, W) of a batch of example inputs (a tensor, or a tuple whose first item is one)."""
    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise CaprojError("example_inputs must be a batch tensor of shape (N, C, H, W)",
                          param="example_inputs")
    return tuple(x.shape[1:])


class Resumable:
    """The resumable state of a CaP job: what a saved state must match, and the state itself
    (CaP's `state_dict` / `load_state_dict`)."""

    _config: CapConfig
    _resolved: CapConfig | None
    _weights_sum: float
    _opt: ProjectionOptimiser | None
    _pending: dict[str, Any] | None
    plan: Plan
    device: torch.device
    proxies: list[torch.Tensor]
    consumer_w: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    history: list[dict]
    timings: dict[str, float]
    step: int

    def _resolve(self) -> None:
        if self._resolved is None:
            self._resolved = self._config.resolve(self.plan.streams_narrowed)

    def fingerprint(self) -> dict:
        """What a saved state must match to be resumed by this job (widths follow from it):
        settings, plan and the original weights (summed once, at construction)."""
        return {"format": STATE_FORMAT, "cap": self._config.as_dict(),
                "plan": {k: v for k, v in self.plan.describe().items()
                         if k not in ("widths", "macs_fraction")},
                "weights": self._weights_sum}

    def state_dict(self) -> dict[str, Any]:
        """Everything the optimisation needs to continue: P proxies, relaxed weights, optimiser
        states, step, history, RNG (tensors and plain values: loads with weights_only=True)."""
        if not self.proxies:
            raise CaprojError("nothing to save before calibrate()", param="state")
        return {"fingerprint": Checkpointer.encode(self.fingerprint()),
                "widths": list(self.plan.widths or []),
                "step": self.step, "timings": dict(self.timings),
                "proxies": [a.detach().clone() for a in self.proxies],
                "consumer_w": {n: w.detach().clone() for n, w in self.consumer_w.items()},
                "base": {k: v.detach().clone() for k, v in self.base.items()
                         if v.is_floating_point()},
                "opts": self._opt.state_dict() if self._opt else None,
                "history": list(self.history), "rng": rng_state()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Continue a saved job: call before `calibrate` (which then keeps the saved P and
        weights and only collects the calibration images), then `optimise`."""
        if st.get("fingerprint") != Checkpointer.encode(self.fingerprint()):
            raise CaprojError("this state was saved by a job with other settings, model or "
                              "weights", param="state")
        self.plan.widths = self.plan.check(list(st["widths"]))
        self._resolve()
        self.proxies = [v.to(self.device) for v in st["proxies"]]
        self.consumer_w = {str(n): v.to(self.device) for n, v in st["consumer_w"].items()}
        for k, v in st["base"].items():
            self.base[k] = v.to(self.device)
        self.history = list(st["history"])
        self.step = int(st["step"])
        # Wall time already spent by the interrupted run(s): a resumed run reports the total.
        before = st.get("timings", {})
        self.timings["earlier_s"] = sum(before.get(k, 0.0) for k in (
            "earlier_s", "calibrate_s", "init_s", "refit_s", "optimise_s"))
        self.timings["resumed_at_step"] = self.step
        self._pending = st


class CaP(Resumable):
    """Compress `model` (never modified; traced with torch.fx to find the sites) with Cascaded
    Projection. `example_inputs`: a batch (only its shape is used). The budget: target_macs,
    keep (channels per site) or widths; allocation "uniform" or "auto"; channel_multiple;
    stream_projection (residual streams too), or a `plan` made already (`compress` passes the
    one all methods share). `config`: a CapConfig, `**options` override its fields.
    loss_fn(outputs, targets) replaces cross-entropy; output_transform picks the logits of
    tuple/dict outputs; `teacher`: distil from it instead of `model`."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor | tuple, *,
                 target_macs: float | None = None, keep: float | None = None,
                 widths: list[int] | None = None, allocation: str = "uniform",
                 channel_multiple: int | None = None, stream_projection: bool = False,
                 sites: list[Site] | None = None, plan: Plan | None = None,
                 config: CapConfig | None = None,
                 loss_fn: LossFn | None = None, output_transform: OutputTransform | None = None,
                 teacher: nn.Module | None = None, progress: bool = True,
                 **options: Any) -> None:
        from caproj.config import CHANNEL_MULTIPLE

        model = unwrap(model)
        if not isinstance(model, nn.Module):
            raise CaprojError(f"model must be an nn.Module, got {type(model).__name__}",
                              param="model")
        self._config = (config or CapConfig()).replace(**options)
        self.plan = plan if plan is not None else Plan.of(
            model, input_shape_of(example_inputs), target_macs=target_macs, keep=keep,
            allocation=allocation, channel_multiple=channel_multiple or CHANNEL_MULTIPLE,
            stream_projection=stream_projection, widths=widths, sites=sites)
        self.orig = model.eval()  # only ever run under no_grad; its flags are left alone
        self.sites = self.plan.sites
        self.loss_fn, self.output_transform = loss_fn, output_transform
        self.teacher = teacher.eval() if teacher is not None else None
        self.progress = progress
        self.device = model_device(model)
        if self.device.type == "cpu":
            steady_allocator()  # calibration's large forwards: no page faults per batch
        self.base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.proxies: list[torch.Tensor] = []
        self.consumer_w: dict[str, torch.Tensor] = {}  # consumer name -> refitted weight
        self.narrow: nn.Module | None = None
        self.calib: list[torch.Tensor] = []
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}
        self.step = 0
        self.label_free = False
        self._resolved: CapConfig | None = None
        self._opt: ProjectionOptimiser | None = None  # built by the first optimise
        self._pending: dict[str, Any] | None = None  # a loaded state awaiting calibrate/optimise
        self._weights_sum = sum(float(v.double().sum()) for v in self.base.values()
                                if v.is_floating_point())
        if self.plan.widths is not None:
            self._resolve()

    @property
    def cfg(self) -> CapConfig:
        """The resolved, frozen settings (learning rates filled in once the widths are known)."""
        return self._resolved if self._resolved is not None else self._config

    @property
    def widths(self) -> list[int]:
        if self.plan.widths is None:
            raise CaprojError("the widths are chosen during calibrate() (allocation='auto')",
                              param="allocation")
        return self.plan.widths

    def projections(self) -> list[torch.Tensor]:
        """Retracted proxies; square ones (sites kept whole) are the identity and stay fixed."""
        return [projection.retract_site(a, s)
                for a, s in zip(self.proxies, self.sites, strict=True)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return surgery.compressed_tensors(self.orig, self.sites, self.base, self.projections(),
                                          self.consumer_w)

    def forward_narrow(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> Any:
        """The narrow network's output for `x` with `tensors` (`tensors()`, or differentiable
        ones) as its weights."""
        if self.narrow is None:
            raise CaprojError("call calibrate() first", param="batches")
        return functional_call(self.narrow, tensors, (x,), strict=False)

    # ------------------------------------------------------------------ 1: calibrate
    @torch.no_grad()
    def calibrate(self, batches: Iterable) -> CaP:
        """Statistics, (automatic widths), initial P and the cascaded least-squares refit, on
        the first `calib_images` images of `batches` (used as given: no augmentation added).
        After `load_state_dict` only the calibration images are kept (for BN re-estimation)."""
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        calib = B.fit_chunks(self.orig, B.take(batches, self.cfg.calib_images,
                                                self.device))
        self.calib = calib[dist.rank()::dist.world()]  # torchrun: statistics are all-reduced
        self.plan.resolve(self.orig, self.calib, Refit.of(self._config), self.output_transform)
        self._resolve()
        self.timings["calibrate_s"] = time.perf_counter() - t0
        if self._pending is not None:  # resumed: P and weights come from the saved state
            self.narrow = surgery.narrow_like(self.orig, self.tensors()).eval()
            return self
        t0 = time.perf_counter()
        self.proxies = projection.initial(self.orig, self.sites, self.widths, self.calib,
                                          self.base, self.cfg.init)
        self.narrow = surgery.narrow_like(self.orig, self.tensors()).eval()
        self.timings["init_s"] = time.perf_counter() - t0
        if self.cfg.refit and self.plan.compressed:
            self.refit()
        return self

    @torch.no_grad()
    def refit(self) -> list[str]:
        """Closed-form least squares of each consumer (every consumer of a stream too), in
        execution order, on the compressed prefix (the calibration batches). Returns the
        consumers in the order they were refitted."""
        t0 = time.perf_counter()
        if self.narrow is None:
            raise CaprojError("call calibrate() before refit()", param="batches")
        ps = self.projections()
        read = {c: (i, sp) for i, s in enumerate(self.sites) for c, sp in s.consumers}
        names = {c for s, k in zip(self.sites, self.widths, strict=True) if k < s.channels
                 for c, _ in s.consumers}

        def prior(name: str) -> torch.Tensor:  # + lambda ||W' - W P||^2: toward the original
            i, sp = read[name]  # consumer read through P, not toward zero
            return surgery.project_in(self.base[f"{name}.weight"], ps[i], self.sites[i], sp)

        def solved(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
            self.consumer_w[name] = w
            return self.tensors()

        surgery.load_tensors(self.narrow, self.tensors())
        order = refit.cascade(self.orig, self.narrow, self.calib, names, ridge=self.cfg.ridge,
                              prior=prior if self.cfg.ridge_to == "projected" else None,
                              solved=solved, block_targets=self.cfg.refit_target == "block",
                              damping=self.cfg.damping, projected=prior)
        self.timings["refit_s"] = time.perf_counter() - t0
        return order

    # ------------------------------------------------------------------ 2: optimisation
    def optimise(self, batches: Iterable, steps: int | None = None,
                 checkpoint: Checkpointer | None = None) -> list[dict]:
        """The mixture-loss optimisation, until `steps` steps in all (default config.steps) have
        been taken, on batches of `batch_size` images regrouped from `batches` (pass after
        pass; `set_epoch(epoch)` is called on it if it has one). The learning rates decay on a
        cosine over max(config.steps, steps), so stopping early and calling again (or
        resuming from `state_dict`) ends where one call would. With a `checkpoint`, the state
        is saved every `checkpoint.every` steps and on SIGTERM/SIGINT."""
        cfg = self.cfg
        if self.narrow is None:
            raise CaprojError("call calibrate() before optimise()", param="batches")
        steps = cfg.steps if steps is None else steps
        if steps < 0:
            raise CaprojError(f"steps must be >= 0, got {steps}", param="steps")
        if self.step >= steps or not self.plan.compressed:
            return self.history  # keep=1.0 leaves the network exactly as it was
        opt = self._optimiser(checkpoint)
        loss = MixtureLoss(cfg, self.orig, self.narrow, self.sites, teacher=self.teacher,
                           loss_fn=self.loss_fn, output_transform=self.output_transform)
        try:
            run_steps(self, opt, loss, batches, steps, checkpoint)
        finally:
            loss.remove()
            opt.train(False)
        return self.history

    def _optimiser(self, checkpoint: Checkpointer | None) -> ProjectionOptimiser:
        """The optimisers (built once), restored from a loaded state or saved at step 0."""
        first_build = self._opt is None
        if self._opt is None:
            self._opt = ProjectionOptimiser(self.cfg, self.sites, self.widths, self.proxies,
                                            self.consumer_w, self.base,
                                            {n for n, _ in self.orig.named_parameters()})
        pending, self._pending = self._pending, None
        if pending is not None and pending.get("opts") is not None:
            self._opt.load_state_dict(pending["opts"])
            set_rng_state(pending["rng"])
        elif first_build and checkpoint is not None and self.step == 0:
            checkpoint.save(0, self.state_dict())  # init + refit done: never redo them
        self._opt.train(True)
        return self._opt

    def reorthonormalise(self, tol: float = 1e-5) -> int:
        """Proxies drifted off orthonormal by more than `tol` re-conditioned in float64
        (`projection.reorthonormalise_`; counted in `timings['reorthonormalised']`)."""
        n = projection.reorthonormalise_(self.proxies, self.sites, tol)
        self.timings["reorthonormalised"] = self.timings.get("reorthonormalised", 0) + n
        return n

    def max_orthonormality_error(self) -> float:
        return max((projection.orthonormality_error(p) for p in self.projections()), default=0.0)

    # ------------------------------------------------------------------ 3: surgery
    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """The compressed network: plain, physically narrower modules, its fresh BNs given
        statistics from the calibration images."""
        if self.narrow is None:
            raise CaprojError("call calibrate() before finalize()", param="batches")
        t = {k: v.detach() for k, v in self.tensors().items()}
        model = surgery.load_tensors(surgery.narrow_like(self.orig, t), t)
        surgery.reestimate_bn(model, self.sites, self.calib)
        return model.eval()

    def run(self, data: Iterable, calib_data: Iterable | None = None,
            checkpoint: Checkpointer | None = None) -> nn.Module:
        """calibrate (on `calib_data`, default `data`), optimise on `data`, finalize. With a
        `checkpoint`, a saved state is resumed and the optimisation saves its own."""
        st = checkpoint.load() if checkpoint is not None else None
        if st is not None:
            self.load_state_dict(st)
        self.calibrate(calib_data if calib_data is not None else data)
        self.optimise(data, checkpoint=checkpoint)
        return self.finalize()  # the caller removes the state once all its work is saved


def with_config(cap: CaP, **changes: Any) -> CaP:
    """A copy of a calibrated job (P, refitted weights, calibration images) whose settings
    differ by `changes`, resolved anew: optimisation variants compared from one start
    (benchmarks/cap_ablation.py). Only before the first `optimise`."""
    if cap._opt is not None or cap.step:
        raise CaprojError("with_config copies a job before its optimisation starts",
                          param="changes")
    new = copy.copy(cap)
    new._config, new._resolved = cap._config.replace(**changes), None
    if cap.plan.widths is not None:
        new._resolve()
    new.plan = copy.copy(cap.plan)
    new.proxies = [a.detach().clone() for a in cap.proxies]
    new.consumer_w = {k: v.detach().clone() for k, v in cap.consumer_w.items()}
    new.base = {k: v.detach().clone() for k, v in cap.base.items()}
    new.narrow = copy.deepcopy(cap.narrow)
    new.history, new.timings = [], dict(cap.timings)
    return new
