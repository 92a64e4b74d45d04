"""Automatic per-site widths under a global MACs budget (`--allocate auto`).

A uniform ratio spends the budget evenly, although sites differ in how much of their signal a
few channels carry and in how much the network's output cares. Here each site gets:

1. a *spectrum*: its channels ranked by the selection score CaP starts from (post-nonlinearity
   energy x consumer weight norm), so e_s(k) = the score mass outside the top k, as a fraction;
2. a *damage curve*: the KL divergence of the network's output from the original's when this
   site alone keeps its top half, then its top quarter (channels masked at the consumer input,
   on a few hundred calibration images), as a function of e_s: piecewise linear through
   (0, 0) and the two measurements, extended with the last slope. Two points, because damage
   accelerates: a classifier's input loses little at half and everything at an eighth, and one
   point extrapolated linearly once cut MobileNetV2's last 1,280 channels to 152.

Widths then grow greedily from each site's minimum, one channel step at a time, always where
the drop in damage per extra MAC is largest, until the MACs target is met to within 1 %
(single channels, then one-for-one channel trades between sites, finish the job if whole steps
cannot get there). The chosen widths are printed
and stored in the checkpoint like uniform ones. Keep = 1.0 (target 1.0) keeps every channel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from caproj import dist, projection, refit
from caproj.budget import MacModel, predict_macs, site_steps, site_units, solve
from caproj.config import CapConfig
from caproj.errors import CaprojError
from caproj.losses import OutputTransform, outputs_of
from caproj.sites import Site
from caproj.utils import run_with_hooks

log = logging.getLogger(__name__)


MAX_GRAM_BYTES = 2 * 2**30  # the consumers' Gram matrices kept for refitted damage, in all


@dataclass
class Refit:
    """How the damage of a narrowed site is measured with its consumers refitted, as CaP's
    least squares does (`caproj.refit.solve`): the ridge, and the damping toward W P."""

    ridge: float = 1e-4
    damping: float = 0.0
    folds: int = 1  # refit on all parts but one of the calibration batches, KL on that one

    @classmethod
    def of(cls, cfg: CapConfig) -> Refit | None:
        """What CaP's settings will refit (None: CaP does not refit, damage is masking)."""
        return cls(cfg.ridge, cfg.damping, cfg.damage_folds) if cfg.refit else None


class Damage:
    """The output damage of one site narrowed alone: the mean KL of the network's output from
    the original's on the sensitivity images, the site reading only the channels kept. With a
    `Refit`, each consumer whose least-squares system is small enough is refitted on the kept
    channels (from the Gram matrix of its input on the calibration images, one pass for all
    sites) instead of merely losing the rest: what CaP's refit will recover is not counted as
    damage. With `Refit.folds` = k > 1 the calibration batches are dealt into k parts; each
    part's KL is taken with the consumers refitted on the other parts (out of sample), and the
    KLs are averaged over all the parts' images (at most `images` in all)."""

    def __init__(self, model: nn.Module, sites: list[Site], calib: list[torch.Tensor],
                 images: int, refit_with: Refit | None,
                 output_transform: OutputTransform | None = None) -> None:
        self.mods, self.refit_with = dict(model.named_modules()), refit_with
        self.model = lambda x: outputs_of(model, x, output_transform)
        k = refit_with.folds if refit_with is not None else 1
        if k > len(calib):
            log.info("damage: %d calibration batches cannot make %d folds; measured in sample",
                     len(calib), k)
            k = 1
        parts = [calib[i::k] for i in range(k)]
        if k > 1 and sum(len(x) for x in calib) > images:
            images = images // k
        # one Gram pass over each part; a fold's refit solves from the sum of the other parts'
        part = [consumer_grams(model, sites, p) if refit_with is not None else {} for p in parts]
        self.folds = [self.Fold(first_images(parts[i], images),
                                part[0] if k == 1 else summed([g for j, g in enumerate(part)
                                                               if j != i]), self.model)
                      for i in range(k)]
        self.n = sum(f.n for f in self.folds)

    class Fold:
        """Images the KL is taken on, their original log-probabilities, and the consumers'
        Gram matrices the refit solves from."""

        def __init__(self, xs: list[torch.Tensor], grams: dict[str, tuple[torch.Tensor, int]],
                     model: Callable[[torch.Tensor], torch.Tensor]) -> None:
            self.xs, self.grams, self.n = xs, grams, sum(len(x) for x in xs)
            self.ref = [F.log_softmax(model(x).float(), 1) for x in xs]

    def __call__(self, site: Site, keep: torch.Tensor) -> float:
        return sum(self.kl_sum(f, site, keep) for f in self.folds) / self.n

    def kl_sum(self, fold: Fold, site: Site, keep: torch.Tensor) -> float:
        mask = torch.zeros(site.channels, device=keep.device)
        mask[keep] = 1.0

        def pre(m, inp, spatial):
            x = inp[0]
            if isinstance(m, nn.Linear):  # after flatten (channels x spatial), or on tokens
                return (x * mask.repeat_interleave(spatial),)
            return (x * mask.view(1, -1, *([1] * (x.dim() - 2))),)

        hooks, swapped = [], []
        for c, sp in site.consumers:
            m = self.mods[c]
            if c in fold.grams and self.refit_with is not None:
                swapped.append((m, m.weight.data))
                m.weight.data = refitted_weight(m, *fold.grams[c], keep, site.channels,
                                                self.refit_with)
            else:
                hooks.append(m.register_forward_pre_hook(lambda m, i, sp=sp: pre(m, i, sp)))
        try:
            return sum(F.kl_div(F.log_softmax(self.model(x).float(), 1), r, log_target=True,
                                reduction="sum").item()
                       for x, r in zip(fold.xs, fold.ref, strict=True))
        finally:
            for h in hooks:
                h.remove()
            for m, w in swapped:
                m.weight.data = w


def summed(grams: list[dict[str, tuple[torch.Tensor, int]]]
           ) -> dict[str, tuple[torch.Tensor, int]]:
    """The Gram matrices and row counts of several parts of the images, added per consumer."""
    return {c: (sum((g[c][0] for g in grams[1:]), grams[0][c][0].clone()),
                sum(g[c][1] for g in grams)) for c in grams[0]}


def first_images(batches: list[torch.Tensor], images: int) -> list[torch.Tensor]:
    """The first `images` images of `batches`, as batches."""
    out, n = [], 0
    for x in batches:
        if n >= images:
            break
        out.append(x[: images - n])
        n += len(out[-1])
    return out


def consumer_grams(model: nn.Module, sites: list[Site], calib: list[torch.Tensor]
                   ) -> dict[str, tuple[torch.Tensor, int]]:
    """{consumer: (the Gram matrix of its least-squares system, its rows)} for every ungrouped
    Conv2d or Linear consumer, in call order while they fit in MAX_GRAM_BYTES (float64)."""
    mods = dict(model.named_modules())
    out: dict[str, tuple[torch.Tensor, int]] = {}
    hooks, used = [], 0
    for s in sites:
        for c, _ in s.consumers:
            m = mods[c]
            if c in out or not (isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d)
                                and m.groups == 1):
                continue
            d = m.weight[0].numel()
            if used + 8 * d * d > MAX_GRAM_BYTES:
                continue
            used += 8 * d * d
            out[c] = (torch.zeros(d, d, dtype=torch.float64, device=m.weight.device), 0)

            def add(mod, inp, c=c) -> None:
                g, rows = refit.gram(mod, inp[0])
                out[c] = (out[c][0].add_(g), out[c][1] + rows)

            hooks.append(m.register_forward_pre_hook(add))
    run_with_hooks(model, calib, hooks)
    for c, (g, rows) in out.items():
        dist.all_reduce_(g)
        out[c] = (g, int(dist.all_reduce_(torch.tensor(float(rows))).item()))
    return out


def refitted_weight(m: nn.Module, gram: torch.Tensor, rows: int, keep: torch.Tensor,
                    channels: int, how: Refit) -> torch.Tensor:
    """`m`'s weight refitted by least squares to read only channels `keep` of its `channels`
    inputs (the others' columns zero), reproducing its output on the calibration images."""
    w = m.weight.detach()
    per = w[0].numel() // channels  # columns per channel: k x k, or the spatial positions
    cols = (keep.view(-1, 1) * per + torch.arange(per, device=keep.device)).reshape(-1)
    flat = w.reshape(w.shape[0], -1).double()
    kept = w.reshape(w.shape[0], channels, -1)[:, keep]
    kept = kept.reshape(w.shape[0], len(keep), *w.shape[2:]) if w.dim() == 4 else \
        kept.reshape(w.shape[0], -1)
    sub = gram[cols][:, cols][None]
    sol = refit.solve(sub, (gram[cols] @ flat.T)[None], kept, how.ridge, None, anchor=kept,
                      anchor_weight=how.damping * len(cols) / max(rows, 1))
    full = torch.zeros_like(w).reshape(w.shape[0], channels, -1)
    full[:, keep] = sol.reshape(w.shape[0], len(keep), -1).to(w.dtype)
    return full.reshape(w.shape)


@torch.no_grad()
def site_profiles(model: nn.Module, sites: list[Site], calib: list[torch.Tensor],
                  sensitivity_images: int = 500, refit_with: Refit | None = None,
                  output_transform: OutputTransform | None = None
                  ) -> tuple[list[torch.Tensor], list[float]]:
    """Per site: its damage curve (k = 0..c, from 1 to 0) and scale (the sensitivity); with
    `refit_with`, damage as CaP's least-squares refit leaves it (`Damage`)."""
    model.eval()
    stats = projection.collect_stats(model, sites, calib)
    weights = dict(model.named_parameters())
    scores = [projection.selection_scores(st, weights, s) for s, st in zip(sites, stats,
                                                                           strict=True)]
    damage = Damage(model, sites, calib, sensitivity_images, refit_with, output_transform)
    curves, sens = [], []
    for s, score in zip(sites, scores, strict=True):
        kept = torch.cat([score.new_zeros(1).double(),
                          score.double().sort(descending=True).values.cumsum(0)])
        lost = (1 - kept / kept[-1].clamp_min(1e-30)).clamp_min(0).float().cpu()
        order = score.argsort(descending=True)
        points = [(lost[k].item(), max(damage(s, order[:k]), 1e-12))
                  for k in sorted({max(1, s.channels // 2), max(1, s.channels // 4)})]
        d = damage_curve(lost, points)  # KL against channels kept
        sens.append(max(d[0].item(), 1e-12))  # the scale; the curve keeps its shape in [0, 1]
        curves.append(d / sens[-1])
    return curves, sens


def damage_curve(lost: torch.Tensor, points: list[tuple[float, float]]) -> torch.Tensor:
    """The output damage (KL) as a function of the score mass lost, through (0, 0) and the
    measured `points` (lost, KL), ordered by lost mass; piecewise linear, extended with the last
    segment's slope, which is never below the one before (damage accelerates as channels go)."""
    xs, ys, slope = [0.0], [0.0], 0.0
    for e, kl in sorted(points):
        if e <= xs[-1] + 1e-9:
            continue
        slope = max(slope, (kl - ys[-1]) / (e - xs[-1]))
        xs.append(e)
        ys.append(ys[-1] + slope * (e - xs[-2]))
    if len(xs) == 1:  # nothing measured beyond zero loss: proportional to the mass lost
        return lost.clone()
    out = torch.empty_like(lost)
    for j, e in enumerate(lost.tolist()):
        seg = min(max(sum(1 for x in xs[1:] if x < e), 0), len(xs) - 2)
        x0, y0, x1, y1 = xs[seg], ys[seg], xs[seg + 1], ys[seg + 1]
        out[j] = y0 + (y1 - y0) / (x1 - x0) * (e - x0)
    return out


def allocate(mm: MacModel, sites: list[Site], curves: list[torch.Tensor], sens: list[float],
             target: float, multiple: int = 8,
             cost: Callable[[list[int]], float] | None = None,
             what: str = "target_macs", steps: list[int] | None = None,
             shown: float | None = None) -> list[int]:
    """Greedy widths meeting `target` to within 1 % (`solve`, from each site's narrowest step,
    by sensitivity x drop in e_s per unit of cost added). The cost is the MACs (`target`: a
    fraction of mm.total) unless `cost` is given (e.g. predicted latency; `target`: a fraction
    of the full widths' cost). A step that costs nothing or saves time is taken first, so
    widths snap to the top of a plateau of the cost. `steps` (with a custom cost): the only
    width changes allowed per site (a latency table's grid spacing), not channel steps.
    `shown`: the target as the user gave it, for messages (`target` may include a margin)."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
        raise CaprojError(f"{what} must be a number in (0, 1], got {target!r}", param=what)
    units = site_units(sites)
    if steps is not None:
        units = list(steps)
    else:
        steps = site_steps(sites, multiple)
    if cost is None:
        def cost(w: list[int]) -> float:
            return predict_macs(mm, sites, w)
    full = [s.channels for s in sites]
    total = cost(full)
    eps = 1e-9 * max(total, 1e-30)

    def value(i: int, k: int, nk: int, new: float, cur: float) -> float:
        gain = sens[i] * (curves[i][k] - curves[i][nk]).item()
        return gain / max(new - cur, eps) if new - cur > 0 else 1e30 + gain

    floor = cost(list(steps))
    if floor > target * total >= cost(list(units)):  # a small network: single channels
        # reach the target where the sites' narrowest steps do not
        log.warning("automatic allocation: the narrowest widths in steps of %s already cost "
                    "%.3f of the %s; uniform widths instead", steps, floor / total,
                    "MACs" if what == "target_macs" else "cost")
        return solve(full, cost, target * total, steps=steps, units=units,
                     what=f"{what} {target if shown is None else shown:g}")
    widths = solve(full, cost, target * total, steps=steps, start=list(steps), value=value,
                   trades=True, what=f"{what} {target if shown is None else shown:g}",
                   units=units)
    log.info("automatic allocation: widths %s (%.3f of the %s)", widths, cost(widths) / total,
             "MACs" if what == "target_macs" else "cost")
    return widths
