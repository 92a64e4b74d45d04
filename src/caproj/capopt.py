"""What CaP's optimisation trains, its loss, and how it steps (`caproj.cap.CaP.optimise`).

The projection proxies (a site kept whole or a selection site stays fixed) train with Adam at
`lr`; with `relax` "consumer" or "all", the consumers' weights (refitted, else W P) and, with
"all", every other weight of the original train too, at `weight_lr`. Odd and even sites step
alternately; the shared weights step every time. The rates decay on a cosine to zero over the
horizon.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from caproj import batches as B
from caproj import dist, projection, surgery
from caproj.config import CapConfig
from caproj.losses import (
    LossFn,
    OutputTransform,
    Taps,
    check_finite,
    check_targets,
    logits_of,
    reconstruction,
    task_loss,
)
from caproj.resume import Checkpointer
from caproj.sites import Site
from caproj.train import bf16_supported
from caproj.train import progress as progress_bar

log = logging.getLogger(__name__)


class ProjectionOptimiser:
    """The optimisers of one CaP job: pairs (proxies, consumer weights) that alternate by
    step parity, and the shared weights (built once; their tensors are the job's own)."""

    def __init__(self, cfg: CapConfig, sites: list[Site], widths: list[int],
                 proxies: list[torch.Tensor], consumer_w: dict[str, torch.Tensor],
                 base: dict[str, torch.Tensor], param_names: set[str]) -> None:
        groups: list[list[torch.Tensor]] = [[], []]
        for i, (a, s) in enumerate(zip(proxies, sites, strict=True)):
            if a.shape[0] != a.shape[1] and not s.selection:
                groups[i % 2].append(a)
        wgroups: list[list[torch.Tensor]] = [[], []]
        if cfg.relax in ("consumer", "all"):
            ps0 = [projection.retract_site(a, s).detach()
                   for a, s in zip(proxies, sites, strict=True)]
            for i, s in enumerate(sites):
                for j, (cons, spatial) in enumerate(s.consumers):
                    if cons not in consumer_w:
                        if widths[i] == s.channels or j > 0:
                            continue  # whole sites stay exact; a stream's other consumers
                            # without a refit learn through the shared weights below
                        consumer_w[cons] = surgery.project_in(
                            base[f"{cons}.weight"], ps0[i], s, spatial).contiguous()
                    wgroups[i % 2].append(consumer_w[cons])
        shared: list[torch.Tensor] = []
        if cfg.relax == "all":
            consumers = {f"{c}.weight" for c in consumer_w}
            shared = [v for k, v in base.items()
                      if k in param_names and k not in consumers and v.is_floating_point()]
        pairs = [(torch.optim.Adam(groups[g], lr=cfg.lr) if groups[g] else None,
                  torch.optim.Adam(wgroups[g], lr=cfg.weight_lr) if wgroups[g] else None)
                 for g in (0, 1)]
        self.pairs = [o for o in pairs if o != (None, None)]
        self.shared = torch.optim.Adam(shared, lr=cfg.weight_lr) if shared else None
        self.all = [o for pair in self.pairs for o in pair if o is not None] + \
            ([self.shared] if self.shared else [])
        for o in self.all:
            for g in o.param_groups:
                g["base_lr"] = g["lr"]

    def params(self) -> list[torch.Tensor]:
        return [t for o in self.all for g in o.param_groups for t in g["params"]]

    def train(self, on: bool) -> None:
        """Every tensor the optimisers hold trains (again, after a previous optimise call),
        or is frozen."""
        for t in self.params():
            t.requires_grad_(on)

    def step(self, loss: torch.Tensor, step: int, horizon: int) -> None:
        """Back-propagate this rank's share of the loss, sum the gradients over ranks, step
        this parity's pair and the shared weights, then decay the rates (cosine to zero)."""
        for o in self.all:
            o.zero_grad(set_to_none=True)
        loss.backward()
        dist.all_reduce_grads(self.params())
        for o in self.pairs[step % len(self.pairs)] if self.pairs else ():
            if o is not None:
                o.step()
        if self.shared is not None:
            self.shared.step()
        decay = 0.5 * (1 + math.cos(math.pi * (step + 1) / horizon))
        for o in self.all:
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * decay

    def state_dict(self) -> list[dict[str, Any]]:
        return [o.state_dict() for o in self.all]

    def load_state_dict(self, states: list[Mapping[str, Any]]) -> None:
        for o, sd in zip(self.all, states, strict=True):
            o.load_state_dict(sd)


def reconstruction_taps(sites: list[Site]) -> list[tuple[str, int | None]]:
    """Per site: the module whose output the reconstruction term compares, and the site whose
    P lifts it back (when the consumer's own output is projected, i.e. it is also a
    producer)."""
    as_producer = {p: (j, bn) for j, s in enumerate(sites) for p, bn in s.producers}
    as_producer.update({w: (j, None) for j, s in enumerate(sites)  # SE scales
                        for _, w in s.gates})
    taps = []
    for s in sites:
        j, bn = as_producer.get(s.consumer, (None, None))
        taps.append((s.consumer, None) if j is None else (bn or s.consumer, j))
    return taps


class MixtureLoss:
    """CaP's loss on one batch: (1 - kd) task + kd KD(teacher) + recon_weight x the mean
    relative error of each site's tap (its consumer's output, lifted back through P where it
    is projected) against the original's. Hooks stay on the two networks until `remove`."""

    def __init__(self, cfg: CapConfig, original: nn.Module, narrow: nn.Module,
                 sites: list[Site], *, teacher: nn.Module | None = None,
                 loss_fn: LossFn | None = None,
                 output_transform: OutputTransform | None = None) -> None:
        self.cfg, self.original, self.teacher = cfg, original, teacher or original
        self.loss_fn, self.output_transform = loss_fn, output_transform
        self.lifts = [lift for _, lift in reconstruction_taps(sites)]
        self.taps = Taps(narrow, original, [n for n, _ in reconstruction_taps(sites)])
        self.device = next(original.parameters()).device
        self.bf16 = bf16_supported(self.device) if cfg.bf16 is None else cfg.bf16
        self.checked = loss_fn is not None  # the first batch's labels against the outputs

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None,
                 student: Callable[[torch.Tensor], Any], ps: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(this rank's share of the loss, the global loss / ce / recon, the logits);
        `student(x)` runs the narrow network with the current differentiable tensors."""
        cfg = self.cfg
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16,
                                             enabled=self.bf16):
            if self.teacher is not self.original:
                self.original(x)  # the original's features, for the reconstruction term
            t_logits = logits_of(self.teacher(x), self.output_transform).float()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            logits = logits_of(student(x), self.output_transform).float()
        if not self.checked:
            check_targets(logits, y)
            self.checked = True
        pairs = []
        for (yn, yo), lift in zip(self.taps.pairs(), self.lifts, strict=True):
            if lift is not None:  # the tap's output is projected: compare it lifted back
                yn = torch.einsum("ndhw,cd->nchw", yn, ps[lift]) if yn.dim() == 4 \
                    else yn @ ps[lift].T
            pairs.append((yn, yo))
        rec = reconstruction(pairs, self.taps.names, over_ranks=True) if pairs else \
            logits.new_zeros(())
        cls, ce = task_loss(logits, y, t_logits, kd=cfg.kd, temperature=cfg.kd_temperature,
                            loss_fn=self.loss_fn)
        # This rank's share of the global loss: gradients are summed over ranks.
        local = cls / dist.world() + cfg.recon_weight * rec
        parts = {"loss": dist.all_reduce_(local.detach().clone()),
                 "ce": dist.all_reduce_(ce.detach().clone(), average=True),
                 "recon": dist.all_reduce_(rec.detach().clone())}
        return local, parts, logits

    def remove(self) -> None:
        self.taps.remove()


class Optimisable(Protocol):
    """What the optimisation loop reads and advances of a CaP job (`caproj.cap.CaP`)."""

    orig: nn.Module
    sites: list[Site]
    base: dict[str, torch.Tensor]
    consumer_w: dict[str, torch.Tensor]
    device: torch.device
    progress: bool
    step: int
    history: list[dict]
    timings: dict[str, float]
    label_free: bool

    @property
    def cfg(self) -> CapConfig: ...

    def projections(self) -> list[torch.Tensor]: ...

    def forward_narrow(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> Any: ...

    def reorthonormalise(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...


REORTHONORMALISE_EVERY = 25  # steps between checks of the proxies' float32 drift


def run_steps(job: Optimisable, opt: ProjectionOptimiser, loss: MixtureLoss,
              batches: Iterable, steps: int, checkpoint: Checkpointer | None) -> None:
    """`job`'s optimisation from its step to `steps`: batch -> loss -> guard -> step and
    schedule -> re-orthonormalise -> record, log and checkpoint."""
    cfg = job.cfg
    t0 = time.perf_counter() - job.timings.get("optimise_s", 0.0)
    it = B.endless(batches, cfg.batch_size, job.device, job.step)
    sharded = getattr(batches, "sharded", False)
    for step in progress_bar(range(job.step, steps), steps - job.step, "cap", job.progress):
        x, y = next(it)
        if not sharded:  # torchrun: this rank's share
            x, y = dist.shard(x), (dist.shard(y) if y is not None else None)
        job.label_free |= y is None
        ps = job.projections()
        tensors = surgery.compressed_tensors(job.orig, job.sites, job.base, ps, job.consumer_w)
        local, parts, logits = loss(x, y, lambda v, t=tensors: job.forward_narrow(v, t), ps)
        check_finite(parts["loss"], step=step, what="CaP loss", param="lr",
                     detail=f" (ce {parts['ce']:.4g}, recon {parts['recon']:.4g})",
                     advice="lower the learning rates lr / weight_lr", inputs=x,
                     checkpoint=checkpoint)
        opt.step(local, step, max(cfg.steps, steps))
        if (step + 1) % REORTHONORMALISE_EVERY == 0:
            job.reorthonormalise()
        job.history.append(_record(step, parts, logits, y))
        job.step = step + 1
        if cfg.log_every and (step % cfg.log_every == 0 or step == steps - 1):
            r = job.history[-1]
            log.info("cap step %4d: loss %.4f ce %.4f recon %.4f%s", step, r["loss"], r["ce"],
                     r["recon"], f" batch acc {r['acc']:.1f}%" if "acc" in r else "")
        if checkpoint is not None and checkpoint.due(step + 1):
            job.timings["optimise_s"] = time.perf_counter() - t0
            checkpoint.save(step + 1, job.state_dict())
    job.timings["optimise_s"] = time.perf_counter() - t0


def _record(step: int, parts: dict[str, torch.Tensor], logits: torch.Tensor,
            y: torch.Tensor | None) -> dict[str, Any]:
    r: dict[str, Any] = {"step": step, **{k: v.item() for k, v in parts.items()}}
    if y is not None and logits.dim() == 2 and y.dim() == 1:
        r["acc"] = (logits.argmax(1) == y).float().mean().item() * 100
    return r
