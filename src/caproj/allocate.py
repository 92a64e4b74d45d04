"""Automatic per-site widths under a global MACs budget (`--allocate auto`).

A uniform ratio spends the budget evenly, although sites differ in how much of their signal a
few channels carry and in how much the network's output cares. Here each site gets:

1. a *spectrum*: its channels ranked by the selection score CaP starts from (post-nonlinearity
   energy x consumer weight norm), so e_s(k) = the score mass outside the top k, as a fraction;
2. a *sensitivity*: the KL divergence of the network's output from the original's when this
   site alone keeps its top half (channels masked at the consumer input, on a few hundred
   calibration images), divided by e_s(half) — how much output damage a unit of lost score
   costs at this site.

Widths then grow greedily from each site's minimum, one channel step at a time, always where
sensitivity x drop in e_s per extra MAC is largest, until the MACs target is met to within 1 %
(single channels, then one-for-one channel trades between sites, finish the job if whole steps
cannot get there). The chosen widths are printed
and stored in the checkpoint like uniform ones. Keep = 1.0 (target 1.0) keeps every channel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from caproj import projection
from caproj.budget import MacModel, predict_macs, site_steps, site_units, solve
from caproj.errors import CaprojError
from caproj.sites import Site

log = logging.getLogger(__name__)


@torch.no_grad()
def site_profiles(model: nn.Module, sites: list[Site], calib: list[torch.Tensor],
                  sensitivity_images: int = 500) -> tuple[list[torch.Tensor], list[float]]:
    """Per site: e_s(k) for k = 0..c (a tensor of c+1 fractions) and the sensitivity."""
    model.eval()
    stats = projection.collect_stats(model, sites, calib)
    weights = dict(model.named_parameters())
    scores = [projection.selection_scores(st, weights, s) for s, st in zip(sites, stats,
                                                                           strict=True)]
    curves = []
    for score in scores:
        kept = torch.cat([score.new_zeros(1).double(),
                          score.double().sort(descending=True).values.cumsum(0)])
        curves.append((1 - kept / kept[-1].clamp_min(1e-30)).clamp_min(0).float().cpu())
    xs, n = [], 0
    for x in calib:
        if n >= sensitivity_images:
            break
        xs.append(x[: sensitivity_images - n])
        n += len(xs[-1])
    ref = [F.log_softmax(model(x).float(), 1) for x in xs]
    mods = dict(model.named_modules())
    sens = []
    for s, score, curve in zip(sites, scores, curves, strict=True):
        half = max(1, s.channels // 2)
        mask = torch.zeros(s.channels, device=score.device)
        mask[torch.topk(score, half).indices] = 1.0

        def pre(m, inp, spatial, mask=mask):
            x = inp[0]
            if isinstance(m, nn.Linear):  # after flatten (channels x spatial), or on tokens
                return (x * mask.repeat_interleave(spatial),)
            return (x * mask.view(1, -1, *([1] * (x.dim() - 2))),)

        hs = [mods[c].register_forward_pre_hook(lambda m, i, sp=sp, f=pre: f(m, i, sp))
              for c, sp in s.consumers]
        try:
            kl = sum(F.kl_div(F.log_softmax(model(x).float(), 1), r, log_target=True,
                              reduction="sum").item() for x, r in zip(xs, ref, strict=True)) / n
        finally:
            for h in hs:
                h.remove()
        sens.append(max(kl, 1e-12) / max(curve[half].item(), 1e-6))
    return curves, sens


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

    widths = solve(full, cost, target * total, steps=steps, start=list(steps), value=value,
                   trades=True, what=f"{what} {target if shown is None else shown:g}",
                   units=units)
    log.info("automatic allocation: widths %s (%.3f of the %s)", widths, cost(widths) / total,
             "MACs" if what == "target_macs" else "cost")
    return widths
