"""Cascaded Projection (Minnehan & Savakis, CVPR 2019), all sites at once.

Stages (each measured in benchmarks/; see RESULTS.md for what each contributes):
1. calibrate: streamed statistics of every site on calibration images;
2. init: P from `select` (channel selection, orthonormal) or `pca`;
3. refit: cascaded closed-form least squares of each consumer (every consumer of a residual
   stream too) - its input taken from the *compressed* prefix, its target the original
   consumer output - in execution order;
4. optimise: SGD-style (Adam) steps on proxies of P retracted by QR, and optionally the
   compressed weights, with the mixture loss
       (1 - kd) CE(labels) + kd KD(original logits) + λ · mean_i ||ŷ_i - y_i||² / ||y_i||²
   where y_i is site i's consumer output in the original network and ŷ_i in the compressed
   network fed by its own (cascaded) outputs. Odd and even sites are updated alternately.
5. finalize: surgery into plain narrower modules, fresh BNs re-estimated on calibration data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from caproj import dist, projection, surgery
from caproj.data import Batches, Data
from caproj.errors import CaprojError
from caproj.resume import Checkpointer, raise_if_stopped, rng_state, set_rng_state
from caproj.sites import Site
from caproj.train import bf16_supported, kd_loss


@dataclass
class CapConfig:
    init: str = "select"  # select | pca
    calib_images: int = 2000
    steps: int = 600
    # Adam learning rates of the projection proxies and the relaxed weights. None: 1e-3 / 3e-4
    # (best on ResNet-56; weight lr 1e-3 diverges there), or 2e-4 / 1e-4 when a residual stream
    # is compressed: one stream P moves every layer of a stage at once, and at the internal
    # rates ResNet-20's optimisation diverged (batch accuracy 70 % -> 23 %; RESULTS.md).
    lr: float | None = None
    weight_lr: float | None = None
    weight_opt: str = "adam"  # adam | sgd (nesterov, momentum 0.9) for the relaxed weights
    batch_size: int = 128
    recon_weight: float = 1.0
    kd: float = 0.5  # share of distillation in the classification term
    kd_temperature: float = 4.0
    relax: str = "all"  # projection | consumer | all
    refit: bool = True
    alternate: bool = True
    retraction: str = "qr"
    ridge: float = 1e-4
    bn_recalibrate: bool = False  # re-estimate every BN's statistics on the compressed net
    seed: int = 0
    bf16: bool | None = None
    log_every: int = 25

    def validate(self) -> None:
        if self.init not in ("select", "pca"):
            raise CaprojError(f"init must be select or pca, got {self.init!r}")
        if self.weight_opt not in ("adam", "sgd"):
            raise CaprojError(f"weight optimiser must be adam or sgd, got {self.weight_opt!r}")
        if self.relax not in ("projection", "consumer", "all"):
            raise CaprojError(f"relax must be projection, consumer or all, got {self.relax!r}")
        if self.steps < 0:
            raise CaprojError(f"cap steps must be >= 0, got {self.steps}")
        if self.calib_images < 1:
            raise CaprojError(f"calibration images must be >= 1, got {self.calib_images}")
        for name in ("lr", "weight_lr", "recon_weight", "ridge"):
            v = getattr(self, name)
            if v is None and name in ("lr", "weight_lr"):
                continue
            if not (math.isfinite(v) and v >= 0):
                raise CaprojError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {v}")
        if not 0 <= self.kd <= 1:
            raise CaprojError(f"kd must be in [0, 1], got {self.kd}")


class _Stop(Exception):
    pass


def calibration_images(splits: Data, n: int, device: torch.device, batch: int = 250,
                       seed: int = 0) -> list[torch.Tensor]:
    """A fixed random subset of training images (no augmentation), normalised, in batches."""
    return [x for x, _ in Batches.subset_of(splits, n, batch, seed=seed, device=device)]


class CaP:
    """Compress `model`'s `sites` to `widths` channels. `model` itself is never modified."""

    def __init__(self, model: nn.Module, sites: list[Site], widths: list[int],
                 cfg: CapConfig, log: Callable[[str], None] = print) -> None:
        cfg.validate()
        if len(widths) != len(sites):
            raise CaprojError("one width per site needed")
        for s, k in zip(sites, widths, strict=True):
            if not 1 <= k <= s.channels:
                raise CaprojError(f"width {k} for {s.producer} outside [1, {s.channels}]")
        self.orig = model.eval()  # only ever run under no_grad; its flags are left alone
        self.sites, self.widths, self.cfg, self.log = sites, widths, cfg, log
        streams = any(s.tied and k < s.channels for s, k in zip(sites, widths, strict=True))
        self.lr = cfg.lr if cfg.lr is not None else (2e-4 if streams else 1e-3)
        self.weight_lr = cfg.weight_lr if cfg.weight_lr is not None else \
            (1e-4 if streams else 3e-4)
        self.device = next(model.parameters()).device
        self.base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.proxies: list[torch.Tensor] = []
        self.consumer_w: dict[str, torch.Tensor] = {}  # consumer name -> refitted weight
        self.narrow: nn.Module | None = None
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def projections(self) -> list[torch.Tensor]:
        """Retracted proxies; square ones (sites kept whole) are the identity and stay fixed."""
        return [projection.retract(a, self.cfg.retraction) if a.shape[0] != a.shape[1] else a
                for a in self.proxies]

    def tensors(self) -> dict[str, torch.Tensor]:
        return surgery.compressed_tensors(self.orig, self.sites, self.base, self.projections(),
                                          self.consumer_w)

    def _run(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.narrow is not None
        return functional_call(self.narrow, tensors, (x,), strict=False)

    # ------------------------------------------------------------------ 1+2: stats and init
    @torch.no_grad()
    def initialise(self, calib: list[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        stats = projection.collect_stats(self.orig, self.sites, calib)
        ps = []
        for s, k, st in zip(self.sites, self.widths, stats, strict=True):
            if k == s.channels:
                p = torch.eye(k, device=self.device)  # nothing to compress: exact identity
            elif self.cfg.init == "pca":
                p = projection.init_pca(st, k)
            else:
                p = projection.init_select(projection.selection_scores(st, self.base, s), k)
            ps.append(p.to(self.device))
        self.proxies = ps
        t = self.tensors()
        self.narrow = surgery.narrow_like(self.orig, t).eval()
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
    def refit(self, calib: list[torch.Tensor]) -> None:
        """Closed-form least squares of each consumer (every consumer of a stream too), in
        execution order, on the compressed prefix."""
        t0 = time.perf_counter()
        assert self.narrow is not None
        omods = dict(self.orig.named_modules())
        nmods = dict(self.narrow.named_modules())
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
                    y = y - cons_o.bias.view(1, -1, *([1] * (y.dim() - 2)))
                if isinstance(cons_o, nn.Conv2d):
                    cols = F.unfold(xin, cons_o.kernel_size, cons_o.dilation, cons_o.padding,
                                    cons_o.stride)  # N x (c' k k) x L
                    yy = y.reshape(y.shape[0], y.shape[1], -1)  # N x out x L
                    g = torch.einsum("nkl,njl->kj", cols, cols)
                    c = torch.einsum("nkl,nol->ko", cols, yy)
                else:
                    xin = xin.reshape(xin.shape[0], -1)
                    g, c = xin.T @ xin, xin.T @ y
                gram = g.double() if gram is None else gram + g.double()
                cross = c.double() if cross is None else cross + c.double()
            assert gram is not None and cross is not None
            dist.all_reduce_(gram)
            dist.all_reduce_(cross)
            d = gram.shape[0]
            ridge = self.cfg.ridge * torch.trace(gram) / d + 1e-12
            sol = torch.linalg.solve(gram + ridge * torch.eye(d, dtype=gram.dtype,
                                                               device=gram.device), cross)
            w_old = self.base[f"{name}.weight"]
            w = sol.T.float()
            if w_old.dim() == 4:
                w = w.reshape(w_old.shape[0], -1, *w_old.shape[2:])
            self.consumer_w[name] = w.contiguous()
        self.timings["refit_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ 4: optimisation
    def _taps(self) -> list[tuple[str, int | None]]:
        """Per site: the module whose output is compared, and the site whose P lifts it back
        (when the consumer's own output is projected, i.e. it is also a producer)."""
        as_producer = {p: (j, bn) for j, s in enumerate(self.sites) for p, bn in s.producers}
        taps = []
        for s in self.sites:
            j, bn = as_producer.get(s.consumer, (None, None))
            taps.append((s.consumer, None) if j is None else (bn or s.consumer, j))
        return taps

    def fingerprint(self) -> dict:
        """What a saved optimisation state must match to be resumed by this run."""
        return {"format": 2, "cap": asdict(self.cfg), "widths": self.widths,
                "sites": [s.producer for s in self.sites],
                "weights": sum(float(v.double().sum()) for v in self.base.values()
                               if v.is_floating_point())}

    def _load_state(self, st: dict) -> None:
        self.proxies = [v.to(self.device) for v in st["proxies"]]
        self.consumer_w = {str(n): v.to(self.device) for n, v in st["consumer_w"].items()}
        for k, v in st["base"].items():
            self.base[k] = v.to(self.device)
        self.history = list(st["history"])
        # Wall time already spent by the interrupted run(s): a resumed run reports the total.
        before = st.get("timings", {})
        self.timings["earlier_s"] = sum(before.get(k, 0.0) for k in ("earlier_s", "init_s",
                                                                      "refit_s", "optimise_s"))
        self.timings["resumed_at_step"] = st["step"]

    def _state(self, opts: list[torch.optim.Optimizer]) -> dict:
        return {"timings": dict(self.timings),
                "proxies": [a.detach().clone() for a in self.proxies],
                "consumer_w": {i: w.detach().clone() for i, w in self.consumer_w.items()},
                "base": {k: v.detach().clone() for k, v in self.base.items()
                         if v.is_floating_point()},
                "opts": [o.state_dict() for o in opts], "history": self.history,
                "rng": rng_state()}

    def optimise(self, splits: Data, steps: int | None = None,
                 checkpoint: Checkpointer | None = None, state: dict | None = None) -> list[dict]:
        """The mixture-loss optimisation. With a `checkpoint`, the state is saved every
        `checkpoint.every` steps and on SIGTERM/SIGINT; `state` (from `checkpoint.load()`)
        continues a saved run."""
        cfg = self.cfg
        steps = cfg.steps if steps is None else steps
        if steps == 0 or all(k == s.channels for s, k in zip(self.sites, self.widths, strict=True)):
            return []  # nothing is compressed: keep=1.0 leaves the network exactly as it was
        assert self.narrow is not None
        t0 = time.perf_counter()
        start = 0
        if state is not None:
            self._load_state(state)
            start = state["step"]
        use_bf16 = bf16_supported(self.device) if cfg.bf16 is None else cfg.bf16
        # Trainable state.
        groups: list[list[torch.Tensor]] = [[], []]
        for i, a in enumerate(self.proxies):
            if a.shape[0] != a.shape[1]:
                a.requires_grad_(True)
                groups[i % 2 if cfg.alternate else 0].append(a)
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
                    wgroups[i % 2 if cfg.alternate else 0].append(self.consumer_w[cons])
        shared: list[torch.Tensor] = []
        if cfg.relax == "all":
            consumers = {f"{c}.weight" for c in self.consumer_w}
            pnames = {n for n, _ in self.orig.named_parameters()}
            for k, v in self.base.items():
                if k in pnames and k not in consumers and v.is_floating_point():
                    v.requires_grad_(True)
                    shared.append(v)
        def weight_optimiser(params: list[torch.Tensor]) -> torch.optim.Optimizer:
            if cfg.weight_opt == "sgd":
                return torch.optim.SGD(params, lr=self.weight_lr, momentum=0.9, nesterov=True)
            return torch.optim.Adam(params, lr=self.weight_lr)

        # Odd and even sites alternate: one optimiser per parity for P proxies (Adam) and the
        # consumer weights; weights outside the sites (relax=all) are updated every step.
        opts = [(torch.optim.Adam(groups[g], lr=self.lr) if groups[g] else None,
                 weight_optimiser(wgroups[g]) if wgroups[g] else None) for g in (0, 1)]
        opts = [o for o in opts if o != (None, None)]
        shared_opt = weight_optimiser(shared) if shared else None
        all_opts = [o for pair in opts for o in pair if o is not None] + \
            ([shared_opt] if shared_opt else [])
        for o in all_opts:
            for g in o.param_groups:
                g["base_lr"] = g["lr"]
        if state is not None:
            for o, sd in zip(all_opts, state["opts"], strict=True):
                o.load_state_dict(sd)
            set_rng_state(state["rng"])
        elif checkpoint is not None:
            checkpoint.save(0, self._state(all_opts))  # init + refit done: never redo them

        taps = self._taps()
        omods, nmods = dict(self.orig.named_modules()), dict(self.narrow.named_modules())
        got_o: dict[int, torch.Tensor] = {}
        got_n: dict[int, torch.Tensor] = {}
        hooks = []
        for i, (name, _) in enumerate(taps):
            hooks.append(omods[name].register_forward_hook(
                lambda m, inp, out, i=i: got_o.__setitem__(i, out)))
            hooks.append(nmods[name].register_forward_hook(
                lambda m, inp, out, i=i: got_n.__setitem__(i, out)))
        batches = Batches.train_of(splits, cfg.batch_size, seed=cfg.seed, device=self.device)
        it = self._endless(batches, start)
        try:
            for step in range(start, steps):
                x, y = next(it)
                if not batches.sharded:  # torchrun: this rank's share
                    x, y = dist.shard(x), dist.shard(y)
                with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16,
                                                     enabled=use_bf16):
                    t_logits = self.orig(x).float()
                ps = self.projections()
                tensors = surgery.compressed_tensors(self.orig, self.sites, self.base, ps,
                                                     self.consumer_w)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=use_bf16):
                    logits = self._run(x, tensors).float()
                recon = []
                for i, (_, lift) in enumerate(taps):
                    yo, yn = got_o[i].float(), got_n[i].float()
                    if lift is not None:
                        yn = torch.einsum("ndhw,cd->nchw", yn, ps[lift]) if yn.dim() == 4 \
                            else yn @ ps[lift].T
                    # over ranks: Σ_r ||ŷ - y||²_r / Σ_r ||y||²_r (y is a constant)
                    den = dist.all_reduce_(yo.pow(2).sum().detach())
                    recon.append((yn - yo).pow(2).sum() / den.clamp_min(1e-12))
                rec = torch.stack(recon).mean()
                ce = F.cross_entropy(logits, y)
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
                                      f"{ce.item():.4g}, recon {rec.item():.4g}); lower "
                                      f"--cap-lr / --cap-weight-lr{last}")
                for o in all_opts:
                    o.zero_grad(set_to_none=True)
                local.backward()
                if dist.world() > 1:
                    for o in all_opts:
                        for g in o.param_groups:
                            for t in g["params"]:
                                if t.grad is not None:
                                    dist.all_reduce_(t.grad)
                for o in opts[step % len(opts)] if opts else ():
                    if o is not None:
                        o.step()
                if shared_opt is not None:
                    shared_opt.step()
                decay = 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))  # cosine to 0
                for o in all_opts:
                    for g in o.param_groups:
                        g["lr"] = g["base_lr"] * decay
                if (step + 1) % 25 == 0:
                    self.reorthonormalise()
                r = {"step": step, "loss": loss.item(), "ce": ce.item(), "recon": rec.item(),
                     "acc": (logits.argmax(1) == y).float().mean().item() * 100}
                self.history.append(r)
                if cfg.log_every and (step % cfg.log_every == 0 or step == steps - 1):
                    self.log(f"cap step {step:4d}: loss {r['loss']:.4f} ce {r['ce']:.4f} "
                             f"recon {r['recon']:.4f} batch acc {r['acc']:.1f}%")
                if checkpoint is not None and checkpoint.due(step + 1):
                    self.timings["optimise_s"] = time.perf_counter() - t0
                    checkpoint.save(step + 1, self._state(all_opts))
        finally:
            for h in hooks:
                h.remove()
            for a in self.proxies:
                a.requires_grad_(False)
            for w in self.consumer_w.values():
                w.requires_grad_(False)
            for v in self.base.values():
                v.requires_grad_(False)
        self.timings["optimise_s"] = time.perf_counter() - t0
        return self.history

    @staticmethod
    def _endless(batches: Batches, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches forever, from the `start`-th (epochs of `len(batches)` steps)."""
        epoch, offset = divmod(start, len(batches))
        while True:
            batches.set_epoch(epoch, offset)
            yield from batches
            epoch, offset = epoch + 1, 0

    # ------------------------------------------------------------------ 5: surgery
    @torch.no_grad()
    def finalize(self, calib: list[torch.Tensor]) -> nn.Module:
        assert self.narrow is not None
        t = {k: v.detach() for k, v in self.tensors().items()}
        model = surgery.load_tensors(surgery.narrow_like(self.orig, t), t)
        surgery.reestimate_bn(model, self.sites, calib)
        compressed = any(k < s.channels for s, k in zip(self.sites, self.widths, strict=True))
        if self.cfg.bn_recalibrate and compressed:
            surgery.recalibrate_bn(model, calib)
        return model.eval()

    @torch.no_grad()
    def reorthonormalise(self, tol: float = 1e-5) -> int:
        """Guard against float32 drift: a proxy whose retraction is off orthonormal by more than
        `tol` is replaced by its retraction computed in float64 (the same P, re-conditioned).
        Returns how many were replaced (counted in `timings['reorthonormalised']`)."""
        n = 0
        for a in self.proxies:
            if a.shape[0] == a.shape[1]:
                continue
            if projection.orthonormality_error(projection.retract(a, self.cfg.retraction)) > tol:
                a.copy_(projection.retract(a.double(), self.cfg.retraction).to(a.dtype))
                n += 1
        self.timings["reorthonormalised"] = self.timings.get("reorthonormalised", 0) + n
        return n

    def max_orthonormality_error(self) -> float:
        return max((projection.orthonormality_error(p) for p in self.projections()), default=0.0)

    def run(self, splits: Data, checkpoint: Checkpointer | None = None) -> nn.Module:
        """All stages with this config; returns the compressed nn.Module. With a
        `checkpoint` the optimisation saves its state and resumes from it (see caproj.resume)."""
        torch.manual_seed(self.cfg.seed)
        calib = calibration_images(splits, self.cfg.calib_images, self.device, seed=self.cfg.seed)
        calib = calib[dist.rank()::dist.world()]  # torchrun: statistics are all-reduced
        self.initialise(calib)
        st = checkpoint.load() if checkpoint is not None else None
        if st is None and self.cfg.refit:
            self.refit(calib)
        self.optimise(splits, checkpoint=checkpoint, state=st)
        return self.finalize(calib)  # the caller removes the state once all its work is saved

    def config(self) -> dict:
        return asdict(self.cfg) | {"lr": self.lr, "weight_lr": self.weight_lr}
