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
from caproj.errors import CaprojError
from caproj.sites import Site
from caproj.utils import run_with_hooks


def retract(a: torch.Tensor, method: str = "qr") -> torch.Tensor:
    """Map a c x c' proxy to the nearest-ish matrix with orthonormal columns, differentiably."""
    if method == "qr":
        q, r = torch.linalg.qr(a)
        d = torch.sign(torch.diagonal(r))
        d = torch.where(d == 0, torch.ones_like(d), d)
        return q * d  # sign fix: QR is then unique and continuous in a
    if method == "polar":
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return u @ vh
    raise CaprojError(f"unknown retraction {method!r} (qr or polar)")


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

    def add_response(self, z: torch.Tensor) -> None:
        z = z.detach().float().transpose(0, 1).reshape(z.shape[1], -1)  # c x (N*HW)
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

    def add_consumer_input(self, x: torch.Tensor, c: int) -> None:
        x = x.detach().float()
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
        hooks.append(tap.register_forward_hook(lambda m, i, o, st=st: st.add_response(o)))
        hooks.append(mods[s.consumer].register_forward_pre_hook(
            lambda m, i, st=st, c=s.channels: st.add_consumer_input(i[0], c)))
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
    return w.pow(2).sum((0, 2, 3))


def selection_scores(st: SiteStats, weights: Mapping[str, torch.Tensor], site: Site
                     ) -> torch.Tensor:
    """Post-nonlinearity energy x squared norm of the consumer weights reading each channel
    (summed over every consumer of a stream). `weights`: the model's tensors by name."""
    norms = sum(consumer_column_norms(weights[f"{c}.weight"], site, sp)
                for c, sp in site.consumers)
    return (st.energy / max(st.count_in, 1)).float() * norms  # type: ignore[operator]


def init_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(scores, k).indices.sort().values
    p = torch.zeros(len(scores), k, device=scores.device)
    p[idx, torch.arange(k, device=scores.device)] = 1.0
    return p


def init_pca(st: SiteStats, k: int) -> torch.Tensor:
    m = st.second / max(st.count, 1)
    evals, evecs = torch.linalg.eigh(m)
    p = evecs[:, torch.argsort(evals, descending=True)[:k]]
    # Sign: point each direction along the mean response, so ReLU keeps the larger part.
    s = torch.sign(p.T @ (st.mean / max(st.count, 1)))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (p * s).float()
