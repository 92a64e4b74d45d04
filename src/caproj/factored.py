"""Factored fine-tuning: train at the original width, narrow while training, merge at the end.

The anchors that compress without loss (ResRep, Ding et al. 2021) keep training an
over-parameterised network of the original's scale and merge only at the end. Here each
narrowed site gets a c x c "compactor" after its producer's BN, and its consumer's weight
becomes a blend:

    producer -> BN -> C -> act ... -> consumer with weight W(t)

    C h  = E_S B h + (1 - a) sg(h - E_S B h)        rows S of E_S B hold B (k x c), the rest 0
    W(t) = E_S(W') + (1 - a) sg(W_c - E_S(W'))       W' (out x k) on the input channels S

with a = t / ramp_steps and sg a stop-gradient. B starts at P^T (the site's projection:
CaP's, a PCA's, a selection's), W_c is the original consumer and W' starts at W_c P, the
original consumer read through P at its own scale (not a least-squares refit, whose 1.7-7x
scale is what makes narrow fine-tuning fragile). So the forward starts as the original and
narrows smoothly, while the gradient only ever trains the end network (the producer's own
filters and BN at their original scale, B, W'): the part being
removed fades on schedule and cannot be kept alive by SGD, which is what ResRep's masked
compactor gradients ensure. The k rows S are where P's channels are placed so the end is as
near the identity as possible (column j of P goes to the row it weighs most; a selection keeps
its channels where they are, which is ResRep's mask). Once a = 1 the network merges exactly
into the narrow one: the producer becomes B W (BN folded, a fresh BN(k) carries the bias) and
the consumer W'.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from caproj.errors import CaprojError
from caproj.sites import Site
from caproj.surgery import compressed_tensors, load_tensors, narrow_like, project_in

log = logging.getLogger(__name__)


def placement(p: torch.Tensor) -> list[int]:
    """For each column j of P (c x k), a distinct row (channel) of the c: greedily the entries
    of P from the largest down, so the blend from the identity to P^T changes each channel as
    little as it can. A selection's columns land on their own channels."""
    c, k = p.shape
    order = torch.argsort(p.detach().flatten().float().cpu(), descending=True).tolist()
    row_of = [-1] * k
    taken: set[int] = set()
    left = k
    for flat in order:
        i, j = divmod(flat, k)
        if row_of[j] < 0 and i not in taken:
            row_of[j], left = i, left - 1
            taken.add(i)
            if left == 0:
                break
    return row_of


def check_site(s: Site) -> None:
    """The sites a compactor can sit in: one producer, one consumer, no depthwise layer,
    gate or channel map between, not grouped."""
    if s.tied or s.selection or s.groups != 1:
        raise CaprojError(f"factored fine-tuning needs plain sites (one producer, one "
                          f"consumer, nothing but channel-wise ops between, not grouped); "
                          f"{s} is not: narrow only the inner sites "
                          f"(stream_projection=False) or fine-tune without factored",
                          param="factored")


class Compactor(nn.Module):
    """One site's compactor (`after` is a bound method, so a deep copy, as EMA makes, rebinds
    it to the copy's own B)."""

    def __init__(self, p: torch.Tensor, channel_dim: int) -> None:
        super().__init__()
        self.b = nn.Parameter(p.T.detach().clone())
        self.register_buffer("rows", torch.tensor(placement(p), dtype=torch.long,
                                                  device=p.device))
        self.channels, self.channel_dim = p.shape[0], channel_dim
        self.blend = 0.0  # set by Factored before each forward

    def end(self) -> torch.Tensor:
        """E_S B: the c x c matrix with B on rows S."""
        return self.b.new_zeros(self.channels, self.channels).index_copy(0, self.rows, self.b)

    def after(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        m = self.end().to(output.dtype)
        if output.dim() == 4 and self.channel_dim == 1:
            narrowed = F.conv2d(output, m[:, :, None, None])
        else:
            narrowed = torch.movedim(torch.movedim(output, self.channel_dim, -1) @ m.T, -1,
                                     self.channel_dim)
        if self.blend >= 1:
            return narrowed
        return narrowed + (1 - self.blend) * (output - narrowed).detach()


class ConsumerBlend(nn.Module):
    """A consumer's weight as a parametrization: W' on the input channels S, plus the fading,
    gradient-free remainder of the original weight."""

    def __init__(self, target: torch.Tensor, rows: torch.Tensor, channels: int,
                 spatial: int) -> None:
        super().__init__()
        self.target = nn.Parameter(target.detach().clone())
        self.register_buffer("rows", rows.clone())
        self.channels, self.spatial = channels, spatial
        self.blend = 0.0

    def placed(self) -> torch.Tensor:
        """W' with its k input channels at rows S of the c (zeros elsewhere)."""
        t = self.target
        if t.dim() == 2:  # Linear: c blocks of `spatial` features
            t3 = t.reshape(t.shape[0], -1, self.spatial)
            out = t3.new_zeros(t.shape[0], self.channels, self.spatial)
            return out.index_copy(1, self.rows, t3).reshape(t.shape[0], -1)
        out = t.new_zeros(t.shape[0], self.channels, *t.shape[2:])
        return out.index_copy(1, self.rows, t)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        placed = self.placed()
        if self.blend >= 1:
            return placed
        return placed + (1 - self.blend) * (w - placed).detach()


class Factored(nn.Module):
    """`model`'s copy with a compactor and a consumer blend per narrowed site (see the module
    docstring). The blend advances one step per training-mode forward with gradients; `merge()`
    returns the narrow network once it has reached the end (`done`)."""

    def __init__(self, model: nn.Module, sites: list[Site], projections: list[torch.Tensor],
                 ramp_steps: int) -> None:
        super().__init__()
        if ramp_steps < 1:
            raise CaprojError(f"factored fine-tuning needs at least one step to narrow over, "
                              f"got {ramp_steps}", param="factored_ramp")
        kept = [(s, p.detach().float()) for s, p in zip(sites, projections, strict=True)
                if p.shape[1] < p.shape[0]]
        for s, _ in kept:
            check_site(s)
        self.net = copy.deepcopy(model)
        # the architecture without compactors, what `merge` narrows (a list: not a submodule)
        self.skeleton = [copy.deepcopy(model)]
        mods = dict(self.net.named_modules())
        self.sites = [s for s, _ in kept]
        self.compactors = nn.ModuleList(
            Compactor(p.to(mods[s.producer].weight.device),
                       1 if isinstance(mods[s.producer], nn.Conv2d) else -1) for s, p in kept)
        for (s, p), comp in zip(kept, self.compactors, strict=True):
            w = mods[s.consumer].weight  # type: ignore[union-attr]
            blend = ConsumerBlend(project_in(w.detach(), p.to(w), s), comp.rows, s.channels,
                                  s.spatial)
            parametrize.register_parametrization(mods[s.consumer], "weight", blend)
            # only the end network trains: the original consumer is the fading remainder
            mods[s.consumer].parametrizations.weight.original.requires_grad_(False)
        # what the blend is set on before each forward (a deep copy maps these to its own)
        self.blended = [m for m in self.modules() if isinstance(m, (Compactor, ConsumerBlend))]
        self.ramp_steps = int(ramp_steps)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._install()

    def _install(self) -> None:
        mods = dict(self.net.named_modules())
        self.hooks = [mods[s.bn or s.producer].register_forward_hook(comp.after)
                      for s, comp in zip(self.sites, self.compactors, strict=True)]

    def no_weight_decay(self) -> set[str]:
        """The compactors are not decayed (timm's convention, read by the optimiser)."""
        return {f"compactors.{n}" for n, _ in self.compactors.named_parameters()}

    @property
    def blend(self) -> float:
        return min(1.0, float(self.step) / self.ramp_steps)

    @property
    def done(self) -> bool:
        return self.blend >= 1.0

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            self.step += 1
        a = self.blend
        for m in self.blended:
            m.blend = a
        return self.net(*args, **kwargs)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The narrow network computing what this one computes in eval mode (exact once
        `done`): producers B W_f with a fresh BN(k), consumers W'."""
        if not self.done:
            raise CaprojError(f"the compactors are still blending ({self.blend:.3f} of the way "
                              f"to their end form): merge after {self.ramp_steps} training "
                              f"steps", param="factored_ramp")
        base: dict[str, torch.Tensor] = {}
        for k, v in self.net.state_dict().items():  # the parametrized consumers' own weights
            if ".parametrizations.weight.0." not in k:
                base[k.replace(".parametrizations.weight.original", ".weight")] = v.detach()
        mods = dict(self.net.named_modules())
        cons = {s.consumer: mods[s.consumer].parametrizations.weight[0].target.detach()
                for s in self.sites}  # type: ignore[index,union-attr]
        ps = [comp.b.detach().T.to(base[f"{s.producer}.weight"])
              for s, comp in zip(self.sites, self.compactors, strict=True)]
        t = compressed_tensors(self.skeleton[0], self.sites, base, ps, cons)
        return load_tensors(narrow_like(self.skeleton[0], t), t).eval()
