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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from caproj import projection
from caproj.budget import MacModel, predict_macs, site_step
from caproj.errors import CaprojError
from caproj.sites import Site


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
            if x.dim() == 2:  # Linear after flatten: channels x spatial features
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
             log: Callable[[str], None] | None = None) -> list[int]:
    """Greedy widths meeting `target` (fraction of mm.total MACs) to within 1 %."""
    if not (math.isfinite(target) and 0 < target <= 1):
        raise CaprojError(f"target-macs must be in (0, 1], got {target}")
    if target == 1:
        return [s.channels for s in sites]
    budget = target * mm.total
    steps = [site_step(s.channels, multiple) for s in sites]
    widths = list(steps)
    if predict_macs(mm, sites, widths) > budget:
        floor = predict_macs(mm, sites, widths) / mm.total
        raise CaprojError(f"target-macs {target:g} is unreachable: the narrowest allowed widths "
                          f"already use {floor:.3f} of the MACs")

    def grow(step_of: Callable[[int], int]) -> None:
        cur = predict_macs(mm, sites, widths)
        while True:
            best, best_i, best_macs = -1.0, -1, 0
            for i, s in enumerate(sites):
                k = widths[i]
                nk = min(s.channels, k + step_of(i))
                if nk == k:
                    continue
                widths[i] = nk
                macs = predict_macs(mm, sites, widths)
                widths[i] = k
                if macs > budget:
                    continue
                gain = sens[i] * (curves[i][k] - curves[i][nk]).item()
                value = gain / max(macs - cur, 1)
                if value > best:
                    best, best_i, best_macs = value, i, macs
            if best_i < 0:
                return
            widths[best_i] = min(sites[best_i].channels, widths[best_i] + step_of(best_i))
            cur = best_macs

    grow(lambda i: steps[i])
    if predict_macs(mm, sites, widths) < 0.99 * budget:
        grow(lambda i: 1)  # whole steps cannot land within 1 %: single channels finish
    while predict_macs(mm, sites, widths) < 0.99 * budget:
        # Chained sites (VGG-like: a layer is one site's consumer and the next one's producer)
        # can leave every single channel too expensive for the slack: trade one channel of a
        # site for one of another, taking the trade that uses the most of the budget.
        cur, best = predict_macs(mm, sites, widths), None
        for i in range(len(sites)):
            for j in range(len(sites)):
                if i == j or widths[i] <= 1 or widths[j] >= sites[j].channels:
                    continue
                widths[i] -= 1
                widths[j] += 1
                macs = predict_macs(mm, sites, widths)
                widths[i] += 1
                widths[j] -= 1
                if cur < macs <= budget and (best is None or macs > best[0]):
                    best = (macs, i, j)
        if best is None:
            break
        widths[best[1]] -= 1
        widths[best[2]] += 1
    got = predict_macs(mm, sites, widths) / mm.total
    if got < 0.99 * target:
        raise CaprojError(f"automatic allocation reached only {got:.3f} of the MACs for target "
                          f"{target:g}")
    if log is not None:
        log(f"automatic allocation: widths {widths} ({got:.3f} of the MACs)")
    return widths


def auto_widths(model: nn.Module, sites: list[Site], mm: MacModel, splits, target: float,
                multiple: int, calib_images: int, seed: int = 0,
                log: Callable[[str], None] | None = None) -> list[int]:
    """`--allocate auto` end to end: calibration images, profiles, greedy widths."""
    from caproj.cap import calibration_images

    device = next(model.parameters()).device
    calib = calibration_images(splits, calib_images, device, seed=seed)
    curves, sens = site_profiles(model, sites, calib)
    return allocate(mm, sites, curves, sens, target, multiple, log=log)
