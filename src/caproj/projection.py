"""Projections P (c x c', orthonormal columns): retraction of an unconstrained proxy onto the
Stiefel manifold, streamed calibration statistics, and the two initialisations.

- `pca`: top eigenvectors of the second moment of the producer's (BN-folded) responses;
- `select`: a channel selection (columns of the identity, so orthonormal too) ranked by
  post-nonlinearity energy x consumer weight norm, so the optimisation starts no worse than
  pruning with that score.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from caproj import dist
from caproj.sites import Site
from caproj.utils import run_with_hooks


def retract(a: torch.Tensor) -> torch.Tensor:
    """Map a c x c' proxy (or a batch of them) to a matrix with orthonormal columns,
    differentiably: QR with the sign fixed, so it is unique and continuous in `a`."""
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d.unsqueeze(-2)


def blocks(p: torch.Tensor, groups: int) -> torch.Tensor:
    """The G diagonal blocks (G x c/G x c'/G) of a block-diagonal c x c' matrix."""
    c, k = p.shape
    cg, kg = c // groups, k // groups
    idx = torch.arange(groups, device=p.device)
    rows = (idx[:, None] * cg + torch.arange(cg, device=p.device))[:, :, None]
    cols = (idx[:, None] * kg + torch.arange(kg, device=p.device))[:, None, :]
    return p[rows, cols]


def retract_site(a: torch.Tensor, site: Site) -> torch.Tensor:
    """A site's P from its proxy: kept whole (square) is the identity, a selection site's P is
    fixed, a grouped site's is block-diagonal (each block retracted), others `retract`."""
    if a.shape[0] == a.shape[1] or site.selection:
        return a
    if site.groups > 1:
        return torch.block_diag(*retract(blocks(a, site.groups)).unbind(0))
    return retract(a)


def orthonormality_error(p: torch.Tensor) -> float:
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    return (p.T @ p - eye).abs().max().item()


class SiteStats:
    """Streamed per-site statistics: second moment of the producer response (c x c, float64) and
    per-channel energy at the consumer input (after the nonlinearity)."""

    def __init__(self, c: int, device: torch.device) -> None:
        self.second = torch.zeros(c, c, dtype=torch.float64, device=device)
        self.mean = torch.zeros(c, dtype=torch.float64, device=device)
        self.energy = torch.zeros(c, dtype=torch.float64, device=device)
        self.count = 0
        self.count_in = 0

    def add_response(self, z: torch.Tensor, last: bool = False) -> None:
        """`last`: channels on the last dimension (a Linear on tokens / channels-last maps)."""
        z = z.detach().float()
        z = z.reshape(-1, z.shape[-1]).T if last else \
            z.transpose(0, 1).reshape(z.shape[1], -1)  # c x (N*HW)
        self.second += (z @ z.T).double()
        self.mean += z.sum(1).double()
        self.count += z.shape[1]

    def all_reduce(self) -> None:
        """Sum the statistics of every rank (torchrun), so each holds the global ones."""
        if dist.world() == 1:
            return
        for t in (self.second, self.mean, self.energy):
            dist.all_reduce_(t)
        n = dist.all_reduce_(torch.tensor([self.count, self.count_in], dtype=torch.float64,
                                          device=self.second.device))
        self.count, self.count_in = int(n[0]), int(n[1])

    def add_consumer_input(self, x: torch.Tensor, c: int, last: bool = False) -> None:
        """`last`: a Linear consumer reading N-d input (channels on the last dimension)."""
        x = x.detach().float()
        if last and x.dim() > 2:
            x = x.reshape(-1, c, 1)
        else:
            x = x.reshape(x.shape[0], c, -1) if x.dim() == 2 else x.reshape(*x.shape[:2], -1)
        self.energy += x.pow(2).sum((0, 2)).double()
        self.count_in += x.shape[0] * x.shape[2]


@torch.no_grad()
def collect_stats(model: nn.Module, sites: list[Site], batches: Iterable[torch.Tensor]
                  ) -> list[SiteStats]:
    """One pass over calibration batches with hooks; never stores features."""
    mods = dict(model.named_modules())
    device = next(model.parameters()).device
    stats = [SiteStats(s.channels, device) for s in sites]
    hooks = []
    for s, st in zip(sites, stats, strict=True):
        if s.tied:  # a stream: its statistics are those of the tensors its consumers read
            def read(m, inp, st=st, c=s.channels) -> None:
                st.add_response(_channels_first(inp[0], c))
                st.add_consumer_input(inp[0], c)

            hooks += [mods[cons].register_forward_pre_hook(read) for cons, _ in s.consumers]
            continue
        tap = mods[s.bn or s.producer]
        last_p = isinstance(mods[s.producer], nn.Linear)
        last_c = isinstance(mods[s.consumer], nn.Linear)
        hooks.append(tap.register_forward_hook(
            lambda m, i, o, st=st, last=last_p: st.add_response(o, last)))
        hooks.append(mods[s.consumer].register_forward_pre_hook(
            lambda m, i, st=st, c=s.channels, last=last_c: st.add_consumer_input(i[0], c, last)))
    run_with_hooks(model, batches, hooks)
    for st in stats:
        st.all_reduce()
    return stats


def _channels_first(x: torch.Tensor, c: int) -> torch.Tensor:
    """A consumer's input as N x c x rest (a Linear after flatten reads c x spatial features)."""
    return x.reshape(x.shape[0], c, -1) if x.dim() == 2 else x


def consumer_column_norms(w: torch.Tensor, site: Site, spatial: int | None = None
                          ) -> torch.Tensor:
    """Squared norm of the consumer weights reading each middle channel."""
    w = w.detach().float()
    if w.dim() == 2:
        sp = site.spatial if spatial is None else spatial
        return w.reshape(w.shape[0], site.channels, sp).pow(2).sum((0, 2))
    g = site.channels // w.shape[1]  # a grouped consumer: output group g reads input group g
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1).pow(2).sum((1, 3)).reshape(-1)


def selection_scores(st: SiteStats, weights: Mapping[str, torch.Tensor], site: Site
                     ) -> torch.Tensor:
    """Post-nonlinearity energy x squared norm of the consumer weights reading each channel
    (summed over every consumer of a stream). `weights`: the model's tensors by name."""
    norms = sum(consumer_column_norms(weights[f"{c}.weight"], site, sp)
                for c, sp in site.consumers)
    return (st.energy / max(st.count_in, 1)).float() * norms  # type: ignore[operator]


def magnitude_scores(weights: Mapping[str, torch.Tensor], site: Site) -> torch.Tensor:
    """Group-L2 magnitude of each channel, as Torch-Pruning's GroupMagnitudeImportance(p=2)
    ranks it: the squared norms of its producer filters (unfolded), its BN weight and the
    consumer weights reading it, summed over every producer and consumer of the site."""
    total = sum(consumer_column_norms(weights[f"{c}.weight"], site, sp)
                for c, sp in site.consumers)
    for prod, bn in site.producers:
        w = weights[f"{prod}.weight"].detach().float()
        total = total + w.reshape(w.shape[0], -1).pow(2).sum(1)
        if bn and f"{bn}.weight" in weights:
            total = total + weights[f"{bn}.weight"].detach().float().pow(2)
    return total.float()  # type: ignore[union-attr]


def init_select(scores: torch.Tensor, k: int, groups: int = 1) -> torch.Tensor:
    """The columns of the identity of the top-k channels (k/groups from each equal group)."""
    if groups > 1:
        per = scores.reshape(groups, -1)
        top = torch.topk(per, k // groups, dim=1).indices.sort(dim=1).values
        idx = (top + torch.arange(groups, device=scores.device)[:, None] * per.shape[1])
        idx = idx.reshape(-1)
    else:
        idx = torch.topk(scores, k).indices.sort().values
    p = torch.zeros(len(scores), k, device=scores.device)
    p[idx, torch.arange(k, device=scores.device)] = 1.0
    return p


def init_pca(st: SiteStats, k: int, groups: int = 1) -> torch.Tensor:
    """Top-k principal directions of the responses (block-diagonal: k/groups per group)."""
    if groups > 1:
        c, cg = len(st.mean), len(st.mean) // groups
        parts = []
        for g in range(groups):
            sub = SiteStats(cg, st.second.device)
            sub.second = st.second[g * cg:(g + 1) * cg, g * cg:(g + 1) * cg]
            sub.mean, sub.count = st.mean[g * cg:(g + 1) * cg], st.count
            parts.append(init_pca(sub, k // groups))
        assert sum(p.shape[0] for p in parts) == c
        return torch.block_diag(*parts)
    m = st.second / max(st.count, 1)
    evals, evecs = torch.linalg.eigh(m)
    p = evecs[:, torch.argsort(evals, descending=True)[:k]]
    # Sign: point each direction along the mean response, so ReLU keeps the larger part.
    s = torch.sign(p.T @ (st.mean / max(st.count, 1)))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (p * s).float()


@torch.no_grad()
def initial(model: nn.Module, sites: list[Site], widths: list[int],
            batches: Iterable[torch.Tensor], weights: Mapping[str, torch.Tensor],
            init: str = "select") -> list[torch.Tensor]:
    """Each site's first P from the calibration statistics: the identity where the site stays
    whole, else `init` ("select", "magnitude" or "pca"; a site with a depthwise conv inside keeps a
    selection)."""
    device = next(model.parameters()).device
    ps = []
    for s, k, st in zip(sites, widths, collect_stats(model, sites, batches), strict=True):
        if k == s.channels:
            p = torch.eye(k, device=device)  # nothing to compress: exact identity
        elif init == "pca" and not s.selection:
            p = init_pca(st, k, s.groups)
        elif init == "magnitude":
            p = init_select(magnitude_scores(weights, s).to(device), k, s.groups)
        else:
            p = init_select(selection_scores(st, weights, s), k, s.groups)
        ps.append(p.to(device))
    return ps


@torch.no_grad()
def reorthonormalise_(proxies: list[torch.Tensor], sites: list[Site], tol: float = 1e-5) -> int:
    """Guard against float32 drift: a proxy whose retraction is off orthonormal by more than
    `tol` is replaced by its retraction computed in float64 (the same P, re-conditioned).
    Returns how many were replaced."""
    n = 0
    for a, s in zip(proxies, sites, strict=True):
        if a.shape[0] == a.shape[1] or s.selection:
            continue
        if orthonormality_error(retract_site(a, s)) > tol:
            a.copy_(retract_site(a.double(), s).to(a.dtype))
            n += 1
    return n
