"""Budgets: how many channels each site keeps.

MACs of a conv/linear layer are proportional to (output channels) x (input channels), so the
MACs of any choice of widths follow exactly from the original per-layer MACs
(torch.utils.flop_counter); `predict_macs` is checked against a real count after surgery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from caproj.errors import CaprojError
from caproj.metrics import layer_table
from caproj.sites import Site


@dataclass
class MacModel:
    total: int
    layers: dict[str, int]  # leaf layer -> MACs

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...]) -> MacModel:
        rows = layer_table(model, input_shape)
        layers = {r["layer"]: r["macs"] for r in rows if r["macs"]}
        from caproj.metrics import count_macs

        return cls(count_macs(model, input_shape), layers)


def predict_macs(mm: MacModel, sites: list[Site], widths: list[int]) -> int:
    out_f: dict[str, tuple[int, int]] = {}
    in_f: dict[str, tuple[int, int]] = {}
    for s, k in zip(sites, widths, strict=True):
        out_f[s.producer] = (k, s.channels)
        in_f[s.consumer] = (k, s.channels)
    total = mm.total
    for name, macs in mm.layers.items():
        ko, co = out_f.get(name, (1, 1))
        ki, ci = in_f.get(name, (1, 1))
        total += macs * ko * ki // (co * ci) - macs
    return total


def widths_for_keep(sites: list[Site], keep: float) -> list[int]:
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise CaprojError(f"keep must be in (0, 1], got {keep}")
    return [max(1, min(s.channels, round(keep * s.channels))) for s in sites]


def widths_for_macs(mm: MacModel, sites: list[Site], target: float) -> list[int]:
    """Uniform keep ratio solved by bisection, then single channels added greedily (least
    compressed site last) until the MACs fraction is as close to `target` as possible from below."""
    if not (math.isfinite(target) and 0 < target <= 1):
        raise CaprojError(f"target-macs must be in (0, 1], got {target}")
    goal = target * mm.total
    floor = predict_macs(mm, sites, [1] * len(sites))
    if floor > goal:
        raise CaprojError(f"target-macs {target} is unreachable: keeping one channel per site "
                          f"still leaves {floor / mm.total:.3f} of the MACs (the other layers "
                          f"are not compressible here)")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if predict_macs(mm, sites, widths_for_keep(sites, max(mid, 1e-9))) <= goal:
            lo = mid
        else:
            hi = mid
    widths = widths_for_keep(sites, max(lo, 1e-9))
    cur = predict_macs(mm, sites, widths)
    while True:
        best = None
        for i in sorted(range(len(sites)), key=lambda i: widths[i] / sites[i].channels):
            if widths[i] < sites[i].channels:
                w2 = widths.copy()
                w2[i] += 1
                m = predict_macs(mm, sites, w2)
                if m <= goal:
                    best = (i, m)
                    break
        if best is None:
            break
        widths[best[0]] += 1
        cur = best[1]
    if abs(cur / mm.total - target) > 0.01 * target:
        raise CaprojError(f"target-macs {target} cannot be met within 1 % with these sites "
                          f"(closest: {cur / mm.total:.4f})")
    return widths
