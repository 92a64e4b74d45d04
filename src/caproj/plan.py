"""What a compression job narrows and by how much: the sites of a model and their widths.

`Plan.of(model, input_shape, ...)` finds the sites in the traced graph and, for a `keep` ratio
or a uniform `target_macs`, the widths at once; automatic allocation (`allocation="auto"`)
needs calibration batches first (`Plan.resolve(calib)`). Every method works from a Plan, so
they all narrow the same sites to the same MACs.

`target_latency` (a fraction of the original's measured latency in `latency_spec`'s runtime,
batch and threads) budgets time instead of MACs: a per-layer latency model
(`caproj.latency`) is measured first and is the solver's cost; once widths are chosen, the
network they give (shapes only) is measured against the original, interleaved, and if it
misses the target the goal is tightened by the miss and the widths chosen again (at most
`LATENCY_CHECKS` times), so the target holds in measurement, not only in prediction. The
widths aim `LATENCY_MARGIN` (2 %) under the target: the noise of one measurement here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from caproj import latency as L
from caproj.allocate import Refit, allocate, site_profiles
from caproj.budget import (
    MacModel,
    predict_macs,
    solve,
    widths_for_keep,
    widths_for_macs,
)
from caproj.config import CHANNEL_MULTIPLE, LATENCY_CHECKS, LATENCY_MARGIN, TARGET_MACS
from caproj.errors import CaprojError
from caproj.losses import OutputTransform
from caproj.sites import Site, find_sites, require_sites, traced_on
from caproj.utils import check_input_shape

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "auto")


@dataclass
class Plan:
    sites: list[Site]
    mm: MacModel
    input_shape: tuple[int, ...]
    target_macs: float | None
    keep: float | None
    allocation: str
    channel_multiple: int
    stream_projection: bool
    widths: list[int] | None = None  # None until resolved (automatic allocation)
    target_latency: float | None = None
    latency: L.LatencyModel | None = None
    latency_checks: list[dict[str, Any]] | None = None  # measured feedback on the widths
    _profiles: tuple[list[torch.Tensor], list[float]] | None = None

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...], *,
           target_macs: float | None = None, keep: float | None = None,
           allocation: str = "uniform", channel_multiple: int = CHANNEL_MULTIPLE,
           stream_projection: bool = False, widths: list[int] | None = None,
           sites: list[Site] | None = None, target_latency: float | None = None,
           latency_spec: L.Spec | None = None, latency_cache: Any = None) -> Plan:
        if allocation not in ALLOCATIONS:
            raise CaprojError(f"allocation must be uniform or auto, got {allocation!r}",
                              param="allocation")
        given = [n for n, v in (("target_macs", target_macs), ("keep", keep),
                                ("target_latency", target_latency)) if v is not None]
        if len(given) > 1:
            raise CaprojError(f"give one of target_macs, keep, target_latency, not "
                              f"{' and '.join(given)}", param=given[-1])
        if target_latency is not None and not (
                isinstance(target_latency, (int, float)) and math.isfinite(target_latency)
                and 0 < target_latency <= 1):
            raise CaprojError(f"target_latency must be a number in (0, 1], got {target_latency!r}",
                              param="target_latency")
        if not isinstance(channel_multiple, int) or channel_multiple < 1:
            raise CaprojError(f"channel_multiple must be >= 1, got {channel_multiple}",
                              param="channel_multiple")
        if keep is None and target_macs is None and widths is None and target_latency is None:
            target_macs = TARGET_MACS
        if allocation == "auto" and keep is not None:
            raise CaprojError("allocation='auto' chooses the widths for a target_macs budget; "
                              "it does not combine with keep", param="allocation")
        if sites is None:  # a forward that checks its input's shape is traced on zeros
            device = next(iter(model.parameters())).device
            with traced_on(torch.zeros(2, *input_shape, device=device)):
                sites = require_sites(model, stream=stream_projection)
        check_input_shape(model, input_shape)
        mm = MacModel.of(model, input_shape)
        plan = cls(sites, mm, tuple(input_shape), target_macs, keep, allocation,
                   channel_multiple, stream_projection, target_latency=target_latency)
        if target_latency is not None and widths is None:
            if target_latency == 1:  # nothing to save: nothing to measure
                plan.widths = [s.channels for s in sites]
                return plan
            plan.latency = L.LatencyModel.build(model, sites, tuple(input_shape),
                                                latency_spec or L.Spec(), channel_multiple,
                                                cache=latency_cache)
            if allocation == "uniform":
                plan.widths = plan._first_latency_widths(model)
                plan._verify_latency(model)
            return plan
        if widths is not None:
            plan.widths = plan.check(list(widths))
        elif keep is not None:
            plan.widths = widths_for_keep(sites, keep, channel_multiple)
        elif allocation == "uniform":
            plan.widths = widths_for_macs(mm, sites, target_macs,  # type: ignore[arg-type]
                                          channel_multiple)
        else:  # fail now, not after calibration, if the target is out of range or unreachable
            widths_for_macs(mm, sites, target_macs, 1)  # type: ignore[arg-type]
        return plan

    def check(self, widths: list[int]) -> list[int]:
        if len(widths) != len(self.sites):
            raise CaprojError(f"widths has {len(widths)} entries for {len(self.sites)} sites",
                              param="widths")
        for s, k in zip(self.sites, widths, strict=True):
            if not isinstance(k, int) or not 1 <= k <= s.channels:
                raise CaprojError(f"width {k} for {s.producer} outside [1, {s.channels}]",
                                  param="widths")
            if k % s.groups:
                raise CaprojError(f"width {k} for {s.producer} is not a multiple of its "
                                  f"{s.groups} groups", param="widths")
        return widths

    def resolve(self, model: nn.Module, calib: list[torch.Tensor],
                refit_with: Refit | None = None,
                output_transform: OutputTransform | None = None) -> list[int]:
        """The widths, computing the automatic allocation on `calib` if it is still open
        (`refit_with`: the damage measured after the consumers' least-squares refit)."""
        if self.widths is None:
            self._profiles = site_profiles(model, self.sites, calib, refit_with=refit_with,
                                           output_transform=output_transform)
            if self.latency is not None:
                self.widths = self._first_latency_widths(model)
                self._verify_latency(model)
            else:
                self.widths = allocate(self.mm, self.sites, *self._profiles,
                                       self.target_macs,  # type: ignore[arg-type]
                                       self.channel_multiple)
        return self.widths

    def _latency_widths(self, goal: float) -> list[int]:
        """Widths whose predicted latency is `goal` x the original's (within 1 %), on the
        latency model's measured grid (steps = units = the grid's spacing per site)."""
        lm = self.latency
        assert lm is not None
        what = f"target_latency {self.target_latency:g}"
        if self._profiles is not None:
            return allocate(self.mm, self.sites, *self._profiles, goal, self.channel_multiple,
                            cost=lm.predict, what="target_latency", steps=lm.steps,
                            shown=self.target_latency)
        return solve([s.channels for s in self.sites], lm.predict, goal * lm.full_ms,
                     steps=lm.steps, units=lm.steps, what=what, trades=True)

    def _first_latency_widths(self, model: nn.Module) -> list[int]:
        """Aim LATENCY_MARGIN under the target; if the prediction says only the narrowest
        widths come close (within the margin, either side: one measurement's noise), take
        those and let the measurement decide."""
        lm, target = self.latency, self.target_latency
        assert lm is not None and target is not None
        try:
            return self._latency_widths(target * (1 - LATENCY_MARGIN))
        except CaprojError as e:
            if lm.predict(lm.floor) > target * (1 + LATENCY_MARGIN) * lm.full_ms:
                if self.stream_projection or not any(
                        s.tied for s in find_sites(model, stream=True).sites):
                    raise
                raise CaprojError(f"{e}; stream_projection=True narrows the residual "
                                  "streams too", param=e.param) from None
            log.info("target_latency %g: only the narrowest widths come close (predicted "
                     "%.3f); measuring them", target, lm.predict(lm.floor) / lm.full_ms)
            return list(lm.floor)

    def _verify_latency(self, model: nn.Module) -> None:
        """Measure the chosen widths' network (shapes only) against the original, interleaved;
        while the measurement misses the target (less half the margin) by more than its own
        noise (half the interquartile range of the rounds' ratios), tighten the goal by the
        miss (and the margin) and choose again. A miss within the noise keeps the widths the
        latency model chose, so the same job gives the same network run after run."""
        lm, target = self.latency, self.target_latency
        assert lm is not None and target is not None and self.widths is not None
        goal, self.latency_checks = target * (1 - LATENCY_MARGIN), []
        for attempt in range(LATENCY_CHECKS + 1):
            small = L.shape_only(model, self.sites, self.widths)
            r = L.compare({"original": model, "compressed": small}, self.input_shape,
                          lm.spec, repeats=1)
            measured = 1 / r["compressed"]["speedup"]
            noise = r["compressed"].get("ratio_noise", 0.0)
            predicted = lm.predict(self.widths) / lm.full_ms
            self.latency_checks.append({"widths": list(self.widths), "goal": goal,
                                        "predicted": predicted, "measured": measured,
                                        "noise": noise})
            log.info("latency check %d: predicted %.3f, measured %.3f ± %.3f of the original "
                     "(target %.3f)", attempt, predicted, measured, noise, target)
            if measured - noise <= target * (1 - LATENCY_MARGIN / 2) or \
                    attempt == LATENCY_CHECKS:
                break
            goal *= (1 - LATENCY_MARGIN) * target / measured
            try:
                self.widths = self._latency_widths(goal)
            except CaprojError:  # tighter than predicted possible: the narrowest, if not yet
                if self.widths == lm.floor:
                    break
                self.widths = list(lm.floor)

    @property
    def compressed(self) -> bool:
        return self.widths is None or any(k < s.channels for s, k in zip(self.sites, self.widths,
                                                                         strict=True))

    @property
    def streams_narrowed(self) -> bool:
        """A residual stream loses channels (CaP's learning rates drop then)."""
        if self.widths is None:
            return any(s.tied for s in self.sites)
        return any(s.tied and k < s.channels for s, k in zip(self.sites, self.widths,
                                                             strict=True))

    def predicted_macs(self) -> int:
        assert self.widths is not None
        return predict_macs(self.mm, self.sites, self.widths)

    def describe(self) -> dict:
        return {"input_shape": list(self.input_shape), "target_macs": self.target_macs,
                "keep": self.keep, "target_latency": self.target_latency,
                **({"latency_model": self.latency.describe(),
                    "latency_checks": self.latency_checks} if self.latency else {}),
                "allocation": self.allocation, "channel_multiple": self.channel_multiple,
                "stream_projection": self.stream_projection,
                "sites": [str(s) for s in self.sites], "widths": self.widths,
                # what the widths reach (a coarse network may land below the target)
                "macs_fraction": None if self.widths is None else
                self.predicted_macs() / self.mm.total}

