"""Budgets: how many channels each site keeps.

MACs of a conv/linear layer are proportional to (output channels) x (input channels), so the
MACs of any choice of widths follow exactly from the original per-layer MACs
(torch.utils.flop_counter); `predict_macs` is checked against a real count after surgery.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from caproj.errors import CaprojError
from caproj.metrics import layer_table
from caproj.sites import Site

log = logging.getLogger(__name__)


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
    mid_f: dict[str, tuple[int, int]] = {}  # depthwise convs: MACs scale with k / c once
    map_in: dict[str, tuple[int, int]] = {}
    map_out: dict[str, tuple[int, int]] = {}
    for s, k in zip(sites, widths, strict=True):
        for p, _ in s.producers:
            out_f[p] = (k, s.channels)
        for c, _ in s.consumers:
            in_f[c] = (k, s.channels)
        for m in s.mids:
            mid_f[m] = (k, s.channels)
        for reader, writer in s.gates:
            in_f[reader] = (k, s.channels)
            out_f[writer] = (k, s.channels)
        for m in s.maps_out:
            map_in[m] = (k, s.channels)
        for m in s.maps_in:
            map_out[m] = (k, s.channels)
    total = mm.total
    for name, macs in mm.layers.items():
        ko, co = out_f.get(name, (1, 1))
        ki, ci = in_f.get(name, mid_f.get(name, (1, 1)))
        total += macs * ko * ki // (co * ci) - macs
    for m in set(map_in) | set(map_out):
        c_in, c_out, pixels = mm.shapes[m]
        ki, ko = map_in.get(m, (c_in, c_in))[0], map_out.get(m, (c_out, c_out))[0]
        if (ki, ko) != (c_in, c_out):  # both sides whole: still the free padding
            total += ki * ko * pixels
    return total


def site_step(c: int, multiple: int, groups: int = 1) -> int:
    """Width granularity of a site: `multiple`, but never coarser than a quarter of it; a
    multiple of the site's groups (equal groups) in any case."""
    return math.lcm(max(1, min(multiple, c // 4)), groups)


def site_steps(sites: list[Site], multiple: int) -> list[int]:
    return [site_step(s.channels, multiple, s.groups) for s in sites]


def site_units(sites: list[Site]) -> list[int]:
    """The finest width change each site allows (its groups: equal widths per group)."""
    return [s.groups for s in sites]


def widths_for_keep(sites: list[Site], keep: float, multiple: int = 1) -> list[int]:
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0 < keep <= 1):
        raise CaprojError(f"keep must be a number in (0, 1], got {keep!r}", param="keep")
    if multiple < 1:
        raise CaprojError(f"channel_multiple must be >= 1, got {multiple}",
                          param="channel_multiple")
    if keep == 1:
        return [s.channels for s in sites]
    steps = site_steps(sites, multiple)
    return [max(st, min(s.channels, int(round(keep * s.channels / st)) * st))
            for s, st in zip(sites, steps, strict=True)]


def solve(full: list[int], cost: Callable[[list[int]], int], goal: float, *,
          steps: list[int] | None = None, start: list[int] | None = None,
          value: Callable[[int, int, int, int, int], float] | None = None,
          trades: bool = False, tol: float = 0.01, what: str = "target_macs",
          units: list[int] | None = None) -> list[int]:
    """The one budget solver: sizes (widths, ranks) in [step_i, full_i] whose `cost` lands at
    or just under `goal`, within `tol` of it.

    1. Without `start`: one uniform fraction of `full`, bisected, rounded to each item's step.
    2. Grow one step at a time where `value(i, size, new_size, new_cost, cost)` is largest
       (default: the least-kept item first) while the cost stays within the goal; then single units.
    3. Still short: with `trades`, one-for-one trades between items (chained sites can leave
       every single unit too expensive for the slack); then one unit above the goal if that
       lands within `tol`.
    `units`: the finest change of each size (default 1; grouped sites: their groups).
    Raises CaprojError naming `what` if the goal is unreachable (the floor costs more). When
    the sizes are too coarse to land within `tol`, the nearest reachable cost below the goal
    is taken and logged (the caller's report holds the cost it predicts).
    """
    units = units or [1] * len(full)
    total = cost(list(full))
    if goal >= total:
        return list(full)
    floor = cost(list(start) if start is not None else list(units))
    if floor > goal:
        rest = ("the time of the rest of the network and per-operator overhead do not shrink "
                "with the widths" if what.startswith("target_latency") else
                "the other layers are not compressible here")
        raise CaprojError(f"{what} is unreachable: the narrowest allowed sizes still cost "
                          f"{floor / total:.3f} of the total ({rest})", param=what.split()[0])
    sv = _Solver(full, cost, goal, units, tol, value)
    steps = list(steps or units)
    sizes = list(start) if start is not None else sv.uniform_start(steps)
    sv.grow(sizes, steps)
    if not sv.close(cost(sizes)):
        sv.grow(sizes, units)
    while trades and not sv.close(cost(sizes)) and sv.trade(sizes):
        pass
    sizes = sv.one_above(sizes)
    if not sv.close(cost(sizes)):  # the sizes are too coarse: the nearest budget below
        log.warning("%s cannot be met within %.0f%% with these sizes: taking the nearest "
                    "below it, %.4f of the total", what, tol * 100, cost(sizes) / total)
    return sizes


@dataclass
class _Solver:
    """The moves of `solve` over one problem."""

    full: list[int]
    cost: Callable[[list[int]], int]
    goal: float
    units: list[int]
    tol: float
    value: Callable[[int, int, int, int, int], float] | None

    def close(self, c: float) -> bool:
        return abs(c - self.goal) <= self.tol * self.goal

    def uniform(self, r: float, steps: list[int]) -> list[int]:
        return [max(st, min(f, int(round(r * f / st)) * st))
                for f, st in zip(self.full, steps, strict=True)]

    def bisect(self, steps: list[int]) -> list[int]:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.cost(self.uniform(mid, steps)) <= self.goal else (lo, mid)
        return self.uniform(lo, steps)

    def uniform_start(self, steps: list[int]) -> list[int]:
        """One keep fraction for all, on each item's step (single units where the steps are
        too coarse for the goal)."""
        sizes = self.bisect(steps)
        if self.cost(sizes) > self.goal:
            sizes = self.bisect(list(self.units))
            steps[:] = self.units
        return sizes

    def pick(self, i: int, k: int, nk: int, new: int, cur: int) -> float:
        if self.value is not None:
            return self.value(i, k, nk, new, cur)
        return -k / self.full[i]  # the least-kept item first

    def grow(self, sizes: list[int], step: list[int]) -> None:
        """Add `step` to the best item while the cost stays within the goal (in place)."""
        cur = self.cost(sizes)
        while True:
            best, best_i, best_cost = None, -1, 0
            for i, k in enumerate(sizes):
                nk = min(self.full[i], k + step[i])
                if nk == k:
                    continue
                sizes[i] = nk
                c = self.cost(sizes)
                sizes[i] = k
                if c > self.goal:
                    continue
                v = self.pick(i, k, nk, c, cur)
                if best is None or v > best:
                    best, best_i, best_cost = v, i, c
            if best is None:
                return
            sizes[best_i] = min(self.full[best_i], sizes[best_i] + step[best_i])
            cur = best_cost

    def trade(self, sizes: list[int]) -> bool:
        """The one-unit trade between two items that raises the cost most within the goal
        (in place); False when none does."""
        cur, best = self.cost(sizes), None
        u = self.units
        for i in range(len(sizes)):
            for j in range(len(sizes)):
                if i == j or sizes[i] <= u[i] or sizes[j] >= self.full[j]:
                    continue
                sizes[i] -= u[i]
                sizes[j] += u[j]
                c = self.cost(sizes)
                sizes[i] += u[i]
                sizes[j] -= u[j]
                if cur < c <= self.goal and (best is None or c > best[0]):
                    best = (c, i, j)
        if best is None:
            return False
        sizes[best[1]] -= u[best[1]]
        sizes[best[2]] += u[best[2]]
        return True

    def one_above(self, sizes: list[int]) -> list[int]:
        """Tiny sizes: one unit above the goal may land within `tol`."""
        if self.close(self.cost(sizes)):
            return sizes
        above = []
        for i in range(len(sizes)):
            if sizes[i] < self.full[i]:
                s2 = sizes.copy()
                s2[i] += self.units[i]
                above.append((self.cost(s2), s2))
        if above:
            c, s2 = min(above, key=lambda t: t[0])
            if self.close(c):
                return s2
        return sizes


def widths_for_macs(mm: MacModel, sites: list[Site], target: float,
                    multiple: int = 1) -> list[int]:
    """Per-site widths for a MACs fraction: one uniform keep ratio, then grown least-kept site
    first (`solve`).

    `multiple` > 1 keeps widths at multiples of it where a site is wide enough (the default is
    8): CPU convolution kernels block channels in groups of 8/16. If those steps cannot land
    within 1 % of the target, single channels finish the job on as few sites as needed."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
        raise CaprojError(f"target_macs must be a number in (0, 1], got {target!r}",
                          param="target_macs")
    if multiple < 1:
        raise CaprojError(f"channel_multiple must be >= 1, got {multiple}",
                          param="channel_multiple")
    return solve([s.channels for s in sites], lambda w: predict_macs(mm, sites, w),
                 target * mm.total, steps=site_steps(sites, multiple), units=site_units(sites),
                 what=f"target_macs {target:g}")
