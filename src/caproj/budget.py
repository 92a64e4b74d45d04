"""Budgets: how many channels each site keeps.

MACs of a conv/linear layer are proportional to (output channels) x (input channels), so the
MACs of any choice of widths follow exactly from the original per-layer MACs
(torch.utils.flop_counter); `predict_macs` is checked against a real count after surgery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from caproj.errors import CaprojError
from caproj.metrics import layer_table
from caproj.sites import Site


@dataclass
class MacModel:
    total: int
    layers: dict[str, int]  # leaf layer -> MACs
    # leaf layer -> (input channels, output channels, output H*W), for channel maps' MACs
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...]) -> MacModel:
        rows = layer_table(model, input_shape)
        layers = {r["layer"]: r["macs"] for r in rows if r["macs"]}
        shapes = {r["layer"]: (r["in_shape"][0], r["out_shape"][0],
                               math.prod(r["out_shape"][1:]))
                  for r in rows if r["out_shape"] and r["in_shape"] and len(r["out_shape"]) >= 2}
        from caproj.metrics import count_macs

        return cls(count_macs(model, input_shape), layers, shapes)


def predict_macs(mm: MacModel, sites: list[Site], widths: list[int]) -> int:
    """MACs of the compressed network: every producer/consumer layer scales with its kept
    output/input fraction; a projected channel map (option-A shortcut) costs k_in x k_out per
    output pixel (a 1x1 conv), where the original padding cost nothing."""
    out_f: dict[str, tuple[int, int]] = {}
    in_f: dict[str, tuple[int, int]] = {}
    map_in: dict[str, tuple[int, int]] = {}
    map_out: dict[str, tuple[int, int]] = {}
    for s, k in zip(sites, widths, strict=True):
        for p, _ in s.producers:
            out_f[p] = (k, s.channels)
        for c, _ in s.consumers:
            in_f[c] = (k, s.channels)
        for m in s.maps_out:
            map_in[m] = (k, s.channels)
        for m in s.maps_in:
            map_out[m] = (k, s.channels)
    total = mm.total
    for name, macs in mm.layers.items():
        ko, co = out_f.get(name, (1, 1))
        ki, ci = in_f.get(name, (1, 1))
        total += macs * ko * ki // (co * ci) - macs
    for m in set(map_in) | set(map_out):
        c_in, c_out, pixels = mm.shapes[m]
        ki, ko = map_in.get(m, (c_in, c_in))[0], map_out.get(m, (c_out, c_out))[0]
        if (ki, ko) != (c_in, c_out):  # both sides whole: still the free padding
            total += ki * ko * pixels
    return total


def site_step(c: int, multiple: int) -> int:
    """Width granularity of a site: `multiple`, but never coarser than a quarter of it."""
    return max(1, min(multiple, c // 4))


def _round_width(x: float, c: int, step: int) -> int:
    return max(step, min(c, int(round(x / step)) * step))


def widths_for_keep(sites: list[Site], keep: float, multiple: int = 1) -> list[int]:
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise CaprojError(f"keep must be in (0, 1], got {keep}")
    if multiple < 1:
        raise CaprojError(f"channel multiple must be >= 1, got {multiple}")
    if keep == 1:
        return [s.channels for s in sites]
    return [_round_width(keep * s.channels, s.channels, site_step(s.channels, multiple))
            for s in sites]


def widths_for_macs(mm: MacModel, sites: list[Site], target: float,
                    multiple: int = 1) -> list[int]:
    """Uniform keep ratio solved by bisection, then widths grown one step at a time, least-kept
    site first, while the MACs stay at or below `target`.

    `multiple` > 1 keeps widths at multiples of it where a site is wide enough (the CLI's
    default is 8): CPU convolution kernels block channels in groups of 8/16 (the measured effect
    is within noise so far, benchmarks/RESULTS.md). If those steps cannot land within 1 % of
    the target, single channels finish the job on as few sites as needed."""
    if not (math.isfinite(target) and 0 < target <= 1):
        raise CaprojError(f"target-macs must be in (0, 1], got {target}")
    if multiple < 1:
        raise CaprojError(f"channel multiple must be >= 1, got {multiple}")
    goal = target * mm.total
    steps = [site_step(s.channels, multiple) for s in sites]
    floor = predict_macs(mm, sites, [1] * len(sites))
    if floor > goal:
        raise CaprojError(f"target-macs {target} is unreachable: keeping one channel per site "
                          f"still leaves {floor / mm.total:.3f} of the MACs (the other layers "
                          f"are not compressible here)")

    def uniform(r: float) -> list[int]:
        return [_round_width(r * s.channels, s.channels, st) for s, st in zip(sites, steps,
                                                                              strict=True)]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict_macs(mm, sites, uniform(mid)) <= goal else (lo, mid)
    widths = uniform(lo)
    if predict_macs(mm, sites, widths) > goal and multiple > 1:
        return widths_for_macs(mm, sites, target, 1)  # too coarse for this target

    def grow(widths: list[int], step_of) -> list[int]:
        while True:
            for i in sorted(range(len(sites)), key=lambda i: widths[i] / sites[i].channels):
                w2 = widths.copy()
                w2[i] = min(sites[i].channels, widths[i] + step_of(i))
                if w2[i] != widths[i] and predict_macs(mm, sites, w2) <= goal:
                    widths = w2
                    break
            else:
                return widths

    widths = grow(widths, lambda i: steps[i])
    if abs(predict_macs(mm, sites, widths) / mm.total - target) > 0.01 * target:
        widths = grow(widths, lambda i: 1)
    cur = predict_macs(mm, sites, widths)
    if abs(cur / mm.total - target) > 0.01 * target:  # tiny widths: try one channel above
        above = []
        for i in range(len(sites)):
            if widths[i] < sites[i].channels:
                w2 = widths.copy()
                w2[i] += 1
                above.append((predict_macs(mm, sites, w2), w2))
        if above:
            m, w2 = min(above, key=lambda t: t[0])
            if abs(m / mm.total - target) <= 0.01 * target:
                widths, cur = w2, m
    if abs(cur / mm.total - target) > 0.01 * target:
        raise CaprojError(f"target-macs {target} cannot be met within 1 % with these sites "
                          f"(closest below: {cur / mm.total:.4f})")
    return widths
