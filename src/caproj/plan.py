"""What a compression job narrows and by how much: the sites of a model and their widths.

`Plan.of(model, input_shape, ...)` finds the sites in the traced graph and, for a `keep` ratio
or a uniform `target_macs`, the widths at once; automatic allocation (`allocation="auto"`)
needs calibration batches first (`Plan.resolve(calib)`). Every method works from a Plan, so
they all narrow the same sites to the same MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caproj.allocate import auto_widths
from caproj.budget import MacModel, predict_macs, widths_for_keep, widths_for_macs
from caproj.config import CHANNEL_MULTIPLE, TARGET_MACS
from caproj.errors import CaprojError
from caproj.sites import Site, require_sites
from caproj.utils import check_input_shape

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

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...], *,
           target_macs: float | None = None, keep: float | None = None,
           allocation: str = "uniform", channel_multiple: int = CHANNEL_MULTIPLE,
           stream_projection: bool = False, widths: list[int] | None = None,
           sites: list[Site] | None = None) -> Plan:
        if allocation not in ALLOCATIONS:
            raise CaprojError(f"allocation must be uniform or auto, got {allocation!r}",
                              param="allocation")
        if keep is not None and target_macs is not None:
            raise CaprojError("give target_macs or keep, not both", param="keep")
        if not isinstance(channel_multiple, int) or channel_multiple < 1:
            raise CaprojError(f"channel_multiple must be >= 1, got {channel_multiple}",
                              param="channel_multiple")
        if keep is None and target_macs is None and widths is None:
            target_macs = TARGET_MACS
        if allocation == "auto" and keep is not None:
            raise CaprojError("allocation='auto' chooses the widths for a target_macs budget; "
                              "it does not combine with keep", param="allocation")
        sites = sites if sites is not None else require_sites(model, stream=stream_projection)
        check_input_shape(model, input_shape)
        mm = MacModel.of(model, input_shape)
        plan = cls(sites, mm, tuple(input_shape), target_macs, keep, allocation,
                   channel_multiple, stream_projection)
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

    def resolve(self, model: nn.Module, calib: list[torch.Tensor]) -> list[int]:
        """The widths, computing the automatic allocation on `calib` if it is still open."""
        if self.widths is None:
            self.widths = auto_widths(model, self.sites, self.mm, calib,
                                      self.target_macs,  # type: ignore[arg-type]
                                      self.channel_multiple)
        return self.widths

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
                "keep": self.keep,
                "allocation": self.allocation, "channel_multiple": self.channel_multiple,
                "stream_projection": self.stream_projection,
                "sites": [str(s) for s in self.sites], "widths": self.widths}
