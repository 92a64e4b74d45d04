"""Cascaded Projection (Minnehan & Savakis, CVPR 2019), all sites at once.

Stages (each measured in benchmarks/; see RESULTS.md for what each contributes):
1. calibrate: streamed statistics of every site on calibration images; (automatic widths);
   P initialised from `select` (channel selection, orthonormal) or `pca`;
   cascaded closed-form least squares of each consumer (every consumer of a residual
   stream too) - its input taken from the *compressed* prefix, its target the original
   consumer output - in execution order;
2. optimise: SGD-style (Adam) steps on proxies of P retracted by QR, and optionally the
   compressed weights, with the mixture loss
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
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from caproj import batches as B
from caproj import dist, projection, surgery
from caproj.config import CapConfig
from caproj.errors import CaprojError
from caproj.plan import Plan
from caproj.resume import Checkpointer, raise_if_stopped, rng_state, set_rng_state
from caproj.sites import Site
from caproj.train import LossFn, OutputTransform, bf16_supported, kd_loss, model_device
from caproj.train import progress as progress_bar

log = logging.getLogger(__name__)
STATE_FORMAT = 3


class _Stop(Exception):
    pass


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a batch of symmetric positive definite systems (ridge-regularised Gram matrices) by
    Cholesky, one system at a time: batched LU solves hang in some MKL builds with several
    threads (seen with torch 2.14 on 2 threads). Falls back to LU for a system that is not
    numerically positive definite."""
    out = []
    for ai, bi in zip(a, b, strict=True):
        chol, info = torch.linalg.cholesky_ex(ai)
        out.append(torch.cholesky_solve(bi, chol) if int(info) == 0
                   else torch.linalg.solve(ai, bi))
    return torch.stack(out)


def input_shape_of(example_inputs: torch.Tensor | tuple) -> tuple[int, ...]:
    """(C, H, W) of a batch of example inputs (a tensor, or a tuple whose first item is one)."""
    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise CaprojError("example_inputs must be a batch tensor of shape (N, C, H, W)",
                          param="example_inputs")
    return tuple(x.shape[1:])


class CaP:
    """Compress `model` with Cascaded Projection. `model` itself is never modified.

    model: the trained network (its own class; traced with torch.fx to find the sites).
    example_inputs: a batch of inputs (tracing, MACs); only its shape is used.
    target_macs / keep / widths: the budget (fraction of MACs, fraction of channels per site,
        or explicit per-site widths); allocation "uniform" or "auto"; channel_multiple.
    stream_projection: also project residual streams (beyond the paper).
    plan: a `caproj.plan.Plan` already made for this model (then the budget arguments above
        are not used; `caproj.compress` passes the one all methods share).
    config: a CapConfig; `**options` override its fields (steps=300, lr=1e-3, kd=1.0, ...).
    loss_fn(outputs, targets): replaces cross-entropy; output_transform(model output) ->
        logits for models returning tuples/dicts; teacher: distil from it instead of `model`.
    """

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
        self._opt: dict[str, Any] | None = None  # optimisers, built by the first optimise
        self._pending: dict[str, Any] | None = None  # a loaded state awaiting calibrate/optimise
        self._weights_sum = sum(float(v.double().sum()) for v in self.base.values()
                                if v.is_floating_point())
        if self.plan.widths is not None:
            self._resolve()

    # ------------------------------------------------------------------ config
    def _resolve(self) -> None:
        if self._resolved is None:
            self._resolved = self._config.resolve(self.plan.streams_narrowed)

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

    def config(self) -> dict:
        return self.cfg.as_dict()

    # ------------------------------------------------------------------ helpers
    def projections(self) -> list[torch.Tensor]:
        """Retracted proxies; square ones (sites kept whole) are the identity and stay fixed."""
        return [projection.retract_site(a, s)
                for a, s in zip(self.proxies, self.sites, strict=True)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return surgery.compressed_tensors(self.orig, self.sites, self.base, self.projections(),
                                          self.consumer_w)

    def _run(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.narrow is not None
        return functional_call(self.narrow, tensors, (x,), strict=False)

    def _logits(self, out: Any) -> torch.Tensor:
        out = self.output_transform(out) if self.output_transform is not None else out
        if not isinstance(out, torch.Tensor):
            raise CaprojError(f"the model returns {type(out).__name__}, not a tensor of logits; "
                              f"pass output_transform=... to pick the logits",
                              param="output_transform")
        return out

    # ------------------------------------------------------------------ 1: calibrate
    @torch.no_grad()
    def calibrate(self, batches: Iterable) -> CaP:
        """Statistics, (automatic widths), initial P and the cascaded least-squares refit, on
        the first `calib_images` images of `batches` (used as given: no augmentation added).
        After `load_state_dict` only the calibration images are kept (for BN re-estimation)."""
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        calib = B.take(batches, self.cfg.calib_images, self.device)
        self.calib = calib[dist.rank()::dist.world()]  # torchrun: statistics are all-reduced
        self.plan.resolve(self.orig, self.calib)
        self._resolve()
        self.timings["calibrate_s"] = time.perf_counter() - t0
        if self._pending is not None:  # resumed: P and weights come from the saved state
            self.narrow = surgery.narrow_like(self.orig, self.tensors()).eval()
            return self
        self.initialise()
        if self.cfg.refit and self.plan.compressed:
            self.refit()
        return self

    @torch.no_grad()
    def initialise(self) -> None:
        t0 = time.perf_counter()
        stats = projection.collect_stats(self.orig, self.sites, self.calib)
        ps = []
        for s, k, st in zip(self.sites, self.widths, stats, strict=True):
            if k == s.channels:
                p = torch.eye(k, device=self.device)  # nothing to compress: exact identity
            elif self.cfg.init == "pca" and not s.selection:
                p = projection.init_pca(st, k, s.groups)
            else:  # a site with a depthwise conv inside keeps a selection (fixed)
                p = projection.init_select(projection.selection_scores(st, self.base, s), k,
                                           s.groups)
            ps.append(p.to(self.device))
        self.proxies = ps
        self.narrow = surgery.narrow_like(self.orig, self.tensors()).eval()
        self.timings["init_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ 3: cascaded refit
    def _consumer_order(self, x: torch.Tensor) -> list[str]:
        """The consumers of every compressed site, in the order the network runs them, so
        each refit sees a prefix whose earlier consumers are already refitted."""
        names = {c for s, k in zip(self.sites, self.widths, strict=True) if k < s.channels
                 for c, _ in s.consumers}
        order: list[str] = []
        mods = dict(self.orig.named_modules())
        hooks = [mods[c].register_forward_pre_hook(
            lambda m, inp, c=c: order.append(c) if c not in order else None) for c in names]
        try:
            self.orig(x[:1])
        finally:
            for h in hooks:
                h.remove()
        return order

    @torch.no_grad()
    def refit(self) -> None:
        """Closed-form least squares of each consumer (every consumer of a stream too), in
        execution order, on the compressed prefix (the calibration batches)."""
        t0 = time.perf_counter()
        assert self.narrow is not None, "calibrate first"
        calib = self.calib
        omods = dict(self.orig.named_modules())
        nmods = dict(self.narrow.named_modules())
        ps = self.projections()
        read = {c: (i, spatial) for i, s in enumerate(self.sites) for c, spatial in s.consumers}
        for name in self._consumer_order(calib[0]):
            raise_if_stopped("the least-squares refit")
            cons_o, cons_n = omods[name], nmods[name]
            gram, cross = None, None
            tensors = self.tensors()
            for x in calib:
                cap: dict[str, torch.Tensor] = {}

                def grab_in(m, inp, cap=cap):
                    cap["x"] = inp[0]
                    raise _Stop

                def grab_out(m, inp, out, cap=cap):
                    cap["y"] = out
                    raise _Stop

                h = cons_n.register_forward_pre_hook(grab_in)
                try:
                    self._run(x, tensors)
                except _Stop:
                    pass
                finally:
                    h.remove()
                h = cons_o.register_forward_hook(grab_out)
                try:
                    self.orig(x)
                except _Stop:
                    pass
                finally:
                    h.remove()
                xin, y = cap["x"].float(), cap["y"].float()
                if getattr(cons_o, "bias", None) is not None:
                    y = y - (cons_o.bias if isinstance(cons_o, nn.Linear) else
                             cons_o.bias.view(1, -1, *([1] * (y.dim() - 2))))
                if isinstance(cons_o, nn.Conv2d):  # one least squares per group
                    groups = cons_o.groups
                    cols = F.unfold(xin, cons_o.kernel_size, cons_o.dilation, cons_o.padding,
                                    cons_o.stride)  # N x (c' k k) x L, channel-major
                    cols = cols.reshape(cols.shape[0], groups, -1, cols.shape[-1])
                    yy = y.reshape(y.shape[0], groups, y.shape[1] // groups, -1)  # N G o L
                    g = torch.einsum("ngkl,ngjl->gkj", cols, cols)
                    c = torch.einsum("ngkl,ngol->gko", cols, yy)
                else:  # a Linear: every leading dimension is a sample (tokens too)
                    xin, y = xin.reshape(-1, xin.shape[-1]), y.reshape(-1, y.shape[-1])
                    g, c = (xin.T @ xin)[None], (xin.T @ y)[None]
                gram = g.double() if gram is None else gram + g.double()
                cross = c.double() if cross is None else cross + c.double()
            assert gram is not None and cross is not None
            dist.all_reduce_(gram)
            dist.all_reduce_(cross)
            d = gram.shape[-1]
            trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
            ridge = (self.cfg.ridge * trace / d + 1e-12)[:, None, None]
            w_old = self.base[f"{name}.weight"]
            if self.cfg.ridge_to == "projected":  # + lambda ||W' - W P||^2: pulled toward the
                i, spatial = read[name]  # original consumer read through P, not toward zero
                w0 = surgery.project_in(w_old, ps[i], self.sites[i], spatial).double()
                w0 = w0.reshape(gram.shape[0], -1, d).transpose(1, 2)  # G x d x o/G
                cross = cross + ridge * w0
            sol = _spd_solve(gram + ridge * torch.eye(d, dtype=gram.dtype, device=gram.device),
                             cross)
            w = sol.transpose(1, 2).reshape(-1, d).float()  # (G o) x (c'/G k k)
            if w_old.dim() == 4:
                w = w.reshape(w_old.shape[0], -1, *w_old.shape[2:])
            self.consumer_w[name] = w.contiguous()
        self.timings["refit_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ 4: optimisation
    def _taps(self) -> list[tuple[str, int | None]]:
        """Per site: the module whose output is compared, and the site whose P lifts it back
        (when the consumer's own output is projected, i.e. it is also a producer)."""
        as_producer = {p: (j, bn) for j, s in enumerate(self.sites) for p, bn in s.producers}
        as_producer.update({w: (j, None) for j, s in enumerate(self.sites)  # SE scales
                            for _, w in s.gates})
        taps = []
        for s in self.sites:
            j, bn = as_producer.get(s.consumer, (None, None))
            taps.append((s.consumer, None) if j is None else (bn or s.consumer, j))
        return taps

    def fingerprint(self) -> dict:
        """What a saved state must match to be resumed by this job (widths follow from it):
        settings, plan and the original weights (summed once, at construction)."""
        return {"format": STATE_FORMAT, "cap": self._config.as_dict(),
                "plan": {k: v for k, v in self.plan.describe().items() if k != "widths"},
                "weights": self._weights_sum}

    def with_config(self, **changes: Any) -> CaP:
        """A copy of this calibrated job (P, refitted weights, calibration images) whose
        settings differ by `changes`, resolved anew: optimisation variants compared from one
        start (benchmarks/cap_ablation.py). Only before the first `optimise`."""
        if self._opt is not None or self.step:
            raise CaprojError("with_config copies a job before its optimisation starts",
                              param="changes")
        new = copy.copy(self)
        new._config = self._config.replace(**changes)
        new._resolved = None
        if self.plan.widths is not None:
            new._resolve()
        new.plan = copy.copy(self.plan)
        new.proxies = [a.detach().clone() for a in self.proxies]
        new.consumer_w = {k: v.detach().clone() for k, v in self.consumer_w.items()}
        new.base = {k: v.detach().clone() for k, v in self.base.items()}
        new.narrow = copy.deepcopy(self.narrow)
        new.history, new.timings = [], dict(self.timings)
        return new

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything the optimisation needs to continue: P proxies, relaxed weights, optimiser
        states, step, history, RNG (tensors and plain values: loads with weights_only=True)."""
        if not self.proxies:
            raise CaprojError("nothing to save before calibrate()", param="state")
        return {"fingerprint": Checkpointer.encode(self.fingerprint()),
                "widths": list(self.widths),
                "step": self.step, "timings": dict(self.timings),
                "proxies": [a.detach().clone() for a in self.proxies],
                "consumer_w": {n: w.detach().clone() for n, w in self.consumer_w.items()},
                "base": {k: v.detach().clone() for k, v in self.base.items()
                         if v.is_floating_point()},
                "opts": [o.state_dict() for o in self._opt["all"]] if self._opt else None,
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

    # ------------------------------------------------------------------ 2: optimisation
    def _trainable(self) -> dict[str, Any]:
        """Parameter groups and optimisers (built once; odd and even sites alternate)."""
        cfg = self.cfg
        groups: list[list[torch.Tensor]] = [[], []]
        for i, (a, s) in enumerate(zip(self.proxies, self.sites, strict=True)):
            if a.shape[0] != a.shape[1] and not s.selection:
                a.requires_grad_(True)
                groups[i % 2].append(a)
        wgroups: list[list[torch.Tensor]] = [[], []]
        if cfg.relax in ("consumer", "all"):
            ps0 = [p.detach() for p in self.projections()]
            for i, s in enumerate(self.sites):
                for j, (cons, spatial) in enumerate(s.consumers):
                    if cons not in self.consumer_w:
                        if self.widths[i] == s.channels or j > 0:
                            continue  # whole sites stay exact; a stream's other consumers
                            # without a refit learn through the shared weights below
                        self.consumer_w[cons] = surgery.project_in(
                            self.base[f"{cons}.weight"], ps0[i], s, spatial).contiguous()
                    self.consumer_w[cons].requires_grad_(True)
                    wgroups[i % 2].append(self.consumer_w[cons])
        shared: list[torch.Tensor] = []
        if cfg.relax == "all":
            consumers = {f"{c}.weight" for c in self.consumer_w}
            pnames = {n for n, _ in self.orig.named_parameters()}
            for k, v in self.base.items():
                if k in pnames and k not in consumers and v.is_floating_point():
                    v.requires_grad_(True)
                    shared.append(v)

        def weight_optimiser(params: list[torch.Tensor]) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=cfg.weight_lr)

        pairs = [(torch.optim.Adam(groups[g], lr=cfg.lr) if groups[g] else None,
                  weight_optimiser(wgroups[g]) if wgroups[g] else None) for g in (0, 1)]
        pairs = [o for o in pairs if o != (None, None)]
        shared_opt = weight_optimiser(shared) if shared else None
        every = [o for pair in pairs for o in pair if o is not None] + \
            ([shared_opt] if shared_opt else [])
        for o in every:
            for g in o.param_groups:
                g["base_lr"] = g["lr"]
        return {"pairs": pairs, "shared": shared_opt, "all": every}

    def _freeze(self) -> None:
        for a in self.proxies:
            a.requires_grad_(False)
        for w in self.consumer_w.values():
            w.requires_grad_(False)
        for v in self.base.values():
            v.requires_grad_(False)

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
        t0 = time.perf_counter() - self.timings.get("optimise_s", 0.0)
        horizon = max(cfg.steps, steps)
        start = self.step
        use_bf16 = bf16_supported(self.device) if cfg.bf16 is None else cfg.bf16
        first_build = self._opt is None
        if first_build:
            self._opt = self._trainable()
        opt = self._opt
        assert opt is not None
        pending, self._pending = self._pending, None
        if pending is not None and pending.get("opts") is not None:
            for o, sd in zip(opt["all"], pending["opts"], strict=True):
                o.load_state_dict(sd)
            set_rng_state(pending["rng"])
        elif first_build and checkpoint is not None and start == 0:
            checkpoint.save(0, self.state_dict())  # init + refit done: never redo them
        pairs, shared_opt, every = opt["pairs"], opt["shared"], opt["all"]
        self._rearm(every)

        taps = self._taps()
        teacher = self.teacher if self.teacher is not None else self.orig
        omods, nmods = dict(self.orig.named_modules()), dict(self.narrow.named_modules())
        got_o: dict[int, torch.Tensor] = {}
        got_n: dict[int, torch.Tensor] = {}
        hooks = []
        for i, (name, _) in enumerate(taps):
            hooks.append(omods[name].register_forward_hook(
                lambda m, inp, out, i=i: got_o.__setitem__(i, out)))
            hooks.append(nmods[name].register_forward_hook(
                lambda m, inp, out, i=i: got_n.__setitem__(i, out)))
        sharded = getattr(batches, "sharded", False)
        it = B.endless(batches, cfg.batch_size, self.device, start)
        try:
            for step in progress_bar(range(start, steps), steps - start, "cap", self.progress):
                x, y = next(it)
                if not sharded:  # torchrun: this rank's share
                    x = dist.shard(x)
                    y = dist.shard(y) if y is not None else None
                with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16,
                                                     enabled=use_bf16):
                    if teacher is not self.orig:
                        self.orig(x)  # the original's features, for the reconstruction term
                    t_logits = self._logits(teacher(x)).float()
                ps = self.projections()
                tensors = surgery.compressed_tensors(self.orig, self.sites, self.base, ps,
                                                     self.consumer_w)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=use_bf16):
                    logits = self._logits(self._run(x, tensors)).float()
                recon = []
                for i, (_, lift) in enumerate(taps):
                    yo, yn = got_o[i].float(), got_n[i].float()
                    if lift is not None:
                        yn = torch.einsum("ndhw,cd->nchw", yn, ps[lift]) if yn.dim() == 4 \
                            else yn @ ps[lift].T
                    # over ranks: Σ_r ||ŷ - y||²_r / Σ_r ||y||²_r (y is a constant)
                    den = dist.all_reduce_(yo.pow(2).sum().detach())
                    recon.append((yn - yo).pow(2).sum() / den.clamp_min(1e-12))
                rec = torch.stack(recon).mean() if recon else logits.new_zeros(())
                if y is None:  # label-free: distillation from the original only
                    self.label_free = True
                    ce = kd_loss(logits, t_logits, cfg.kd_temperature)
                    cls = ce
                else:
                    ce = self.loss_fn(logits, y) if self.loss_fn is not None else \
                        F.cross_entropy(logits, y)
                    cls = (1 - cfg.kd) * ce
                    if cfg.kd > 0:
                        cls = cls + cfg.kd * kd_loss(logits, t_logits, cfg.kd_temperature)
                # This rank's share of the global loss: gradients are summed over ranks below.
                local = cls / dist.world() + cfg.recon_weight * rec
                loss = dist.all_reduce_(local.detach().clone())
                if dist.world() > 1:
                    ce = dist.all_reduce_(ce.detach().clone(), average=True)
                    rec = dist.all_reduce_(rec.detach().clone())
                if not torch.isfinite(loss):
                    last = (f"; last good state: {checkpoint.path} (step "
                            f"{step - step % checkpoint.every})"
                            if checkpoint is not None and checkpoint.path else "")
                    raise CaprojError(f"CaP loss became {loss.item()} at step {step} (ce "
                                      f"{ce.item():.4g}, recon {rec.item():.4g}); lower the "
                                      f"learning rates lr / weight_lr{last}", param="lr")
                for o in every:
                    o.zero_grad(set_to_none=True)
                local.backward()
                if dist.world() > 1:
                    for o in every:
                        for g in o.param_groups:
                            for t in g["params"]:
                                if t.grad is not None:
                                    dist.all_reduce_(t.grad)
                for o in pairs[step % len(pairs)] if pairs else ():
                    if o is not None:
                        o.step()
                if shared_opt is not None:
                    shared_opt.step()
                decay = 0.5 * (1 + math.cos(math.pi * (step + 1) / horizon))  # cosine to 0
                for o in every:
                    for g in o.param_groups:
                        g["lr"] = g["base_lr"] * decay
                if (step + 1) % 25 == 0:
                    self.reorthonormalise()
                r = {"step": step, "loss": loss.item(), "ce": ce.item(), "recon": rec.item()}
                if y is not None and logits.dim() == 2 and y.dim() == 1:
                    r["acc"] = (logits.argmax(1) == y).float().mean().item() * 100
                self.history.append(r)
                self.step = step + 1
                if cfg.log_every and (step % cfg.log_every == 0 or step == steps - 1):
                    log.info("cap step %4d: loss %.4f ce %.4f recon %.4f%s", step, r["loss"],
                             r["ce"], r["recon"],
                             f" batch acc {r['acc']:.1f}%" if "acc" in r else "")
                if checkpoint is not None and checkpoint.due(step + 1):
                    self.timings["optimise_s"] = time.perf_counter() - t0
                    checkpoint.save(step + 1, self.state_dict())
        finally:
            for h in hooks:
                h.remove()
            self._freeze()
        self.timings["optimise_s"] = time.perf_counter() - t0
        return self.history

    def _rearm(self, every: list[torch.optim.Optimizer]) -> None:
        """Every tensor an optimiser holds trains (again, after a previous optimise call)."""
        for o in every:
            for g in o.param_groups:
                for t in g["params"]:
                    t.requires_grad_(True)

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

    @torch.no_grad()
    def reorthonormalise(self, tol: float = 1e-5) -> int:
        """Guard against float32 drift: a proxy whose retraction is off orthonormal by more than
        `tol` is replaced by its retraction computed in float64 (the same P, re-conditioned).
        Returns how many were replaced (counted in `timings['reorthonormalised']`)."""
        n = 0
        for a, s in zip(self.proxies, self.sites, strict=True):
            if a.shape[0] == a.shape[1] or s.selection:
                continue
            if projection.orthonormality_error(projection.retract_site(a, s)) > tol:
                a.copy_(projection.retract_site(a.double(), s).to(a.dtype))
                n += 1
        self.timings["reorthonormalised"] = self.timings.get("reorthonormalised", 0) + n
        return n

    def max_orthonormality_error(self) -> float:
        return max((projection.orthonormality_error(p) for p in self.projections()), default=0.0)

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
