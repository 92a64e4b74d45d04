"""Compression methods over the same sites, for side-by-side comparison with CaP.

Every channel method decides, per site, a c x c' matrix P and (optionally) refitted consumer
weights; `surgery.apply` then builds the physically narrower network, exactly as for CaP:
- `l1`: keep the filters with the largest L1 norm (Li et al., ICLR 2017);
- `fpgm`: drop the filters closest to the geometric median of the layer (He et al., CVPR 2019);
- `taylor`: first-order Taylor importance of each channel, (sum of grad x BN weight + grad x BN
  bias)^2 over calibration batches (Molchanov et al., CVPR 2019);
- `cp`: channel selection + cascaded least-squares reconstruction of the next layer (He et al.,
  ICCV 2017, "CP"); selection by post-nonlinearity energy x consumer weight norm;
- `pca`: PCA projection without optimisation (the CaP ablation);
- `cap`: the full method (caproj.cap).
`svd` is the factorisation family CaP argues against: each conv of a site becomes a k x k conv
with r filters followed by a 1x1 conv (weight SVD), which adds a layer and activation memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from caproj import projection, surgery
from caproj.budget import MacModel
from caproj.cap import CaP, CapConfig, calibration_images
from caproj.data import Batches, Data
from caproj.errors import CaprojError
from caproj.models import set_submodule
from caproj.sites import Site


def producer_filters(model: nn.Module, site: Site) -> torch.Tensor:
    w = dict(model.named_modules())[site.producer].weight.detach()
    return w.reshape(w.shape[0], -1)


def l1_scores(model: nn.Module, site: Site) -> torch.Tensor:
    return producer_filters(model, site).abs().sum(1)


def fpgm_scores(model: nn.Module, site: Site) -> torch.Tensor:
    """Sum of distances to all other filters: small = near the geometric median = redundant."""
    w = producer_filters(model, site)
    return torch.cdist(w, w).sum(1)


def taylor_scores(model: nn.Module, sites: list[Site], splits: Data, batches: int = 16,
                  batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Molchanov et al. 2019, on the BN after each producer (or its output if no BN)."""
    mods = dict(model.named_modules())
    device = next(model.parameters()).device
    scores = [torch.zeros(s.channels, device=device) for s in sites]
    taps: dict[int, torch.Tensor] = {}
    hooks = []
    for i, s in enumerate(sites):
        def keep(m, inp, out, i=i):
            out.retain_grad()
            taps[i] = out
        hooks.append(mods[s.bn or s.producer].register_forward_hook(keep))
    model.eval()  # BN statistics stay the original ones; gradients only
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    data = Batches.train_of(splits, batch_size, seed=seed, device=device)
    try:
        for n, (x, y) in enumerate(data):
            if n == batches:
                break
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                F.cross_entropy(model(x), y).backward()
            for i in range(len(sites)):
                t = taps[i]
                # d loss / d(channel gate) = sum over positions of grad * activation
                g = (t.grad * t).sum(tuple(d for d in range(t.dim()) if d != 1))
                scores[i] += g.pow(2)
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return scores


def _selection(scores: list[torch.Tensor], sites: list[Site], widths: list[int]
               ) -> list[torch.Tensor]:
    return [torch.eye(s.channels, device=sc.device) if k == s.channels
            else projection.init_select(sc, k) for sc, s, k in zip(scores, sites, widths,
                                                                   strict=True)]


def prune(model: nn.Module, sites: list[Site], widths: list[int], method: str,
          splits: Data, calib_images: int = 2000, seed: int = 0) -> nn.Module:
    """A selection method's compressed network (no fine-tuning)."""
    device = next(model.parameters()).device
    calib = calibration_images(splits, calib_images, device, seed=seed)
    if method == "l1":
        scores = [l1_scores(model, s) for s in sites]
    elif method == "fpgm":
        scores = [fpgm_scores(model, s) for s in sites]
    elif method == "taylor":
        scores = taylor_scores(model, sites, splits, seed=seed)
    else:
        raise CaprojError(f"unknown pruning method {method!r}")
    return surgery.apply(model, sites, _selection(scores, sites, widths), calib=calib)


# ----------------------------------------------------------------------------- factorisation
def svd_factorise(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """conv (out, in, k, k) ~ [conv k x k with `rank` filters] then [1x1 conv to out]."""
    w = conv.weight.detach()
    out_c = w.shape[0]
    u, s, vh = torch.linalg.svd(w.reshape(out_c, -1), full_matrices=False)
    r = max(1, min(rank, s.numel()))
    first = nn.Conv2d(conv.in_channels, r, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, bias=False)
    second = nn.Conv2d(r, out_c, 1, bias=conv.bias is not None)
    first.weight.data.copy_((s[:r, None] * vh[:r]).reshape(r, *w.shape[1:]))
    second.weight.data.copy_(u[:, :r].reshape(out_c, r, 1, 1))
    if conv.bias is not None:
        second.bias.data.copy_(conv.bias.detach())
    return nn.Sequential(first, second).to(w.device)


def svd_layers(sites: list[Site], model: nn.Module) -> list[str]:
    mods = dict(model.named_modules())
    names = []
    for s in sites:
        for n in (s.producer, s.consumer):
            if isinstance(mods[n], nn.Conv2d) and mods[n].kernel_size != (1, 1) and n not in names:
                names.append(n)
    return names


def svd_ranks(mm: MacModel, model: nn.Module, layers: list[str], target: float) -> list[int]:
    """One rank fraction for all layers solved by bisection, then single ranks added greedily,
    so the factorised model has `target` MACs within 1 %."""
    mods = dict(model.named_modules())
    info = []  # (full rank, MACs per unit of rank, original MACs)
    for n in layers:
        c: nn.Conv2d = mods[n]  # type: ignore[assignment]
        kk = c.kernel_size[0] * c.kernel_size[1]
        hw = mm.layers[n] // (c.out_channels * c.in_channels * kk)
        info.append((min(c.out_channels, c.in_channels * kk),
                     (c.in_channels * kk + c.out_channels) * hw, mm.layers[n]))

    def macs(ranks: list[int]) -> int:
        return mm.total + sum(r * per - orig for r, (_, per, orig) in zip(ranks, info,
                                                                          strict=True))

    def uniform(frac: float) -> list[int]:
        return [max(1, round(frac * full)) for full, _, _ in info]

    goal = target * mm.total
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(uniform(mid)) <= goal else (lo, mid)
    ranks = uniform(lo)
    grown = True
    while grown:
        grown = False
        for i in sorted(range(len(ranks)), key=lambda i: ranks[i] / info[i][0]):
            if ranks[i] < info[i][0] and macs(ranks) + info[i][1] <= goal:
                ranks[i] += 1
                grown = True
                break
    if abs(macs(ranks) / mm.total - target) > 0.01 * target:
        raise CaprojError(f"svd cannot reach target-macs {target} within 1 % "
                          f"(closest {macs(ranks) / mm.total:.4f})")
    return ranks


def factorise(model: nn.Module, sites: list[Site], mm: MacModel, target: float) -> nn.Module:
    import copy

    layers = svd_layers(sites, model)
    ranks = svd_ranks(mm, model, layers, target)
    out = copy.deepcopy(model).eval()
    mods = dict(out.named_modules())
    for n, r in zip(layers, ranks, strict=True):
        set_submodule(out, n, svd_factorise(mods[n], r))  # type: ignore[arg-type]
    return out


# ----------------------------------------------------------------------------- Torch-Pruning
def torch_pruning_l2(model: nn.Module, sites: list[Site], widths: list[int],
                     input_shape: tuple[int, ...]) -> nn.Module:
    """Torch-Pruning (DepGraph, CVPR 2023) group-L2 importance on the same sites and widths:
    its own dependency graph and importance, our channel counts (so MACs match exactly)."""
    import copy

    try:
        import torch_pruning as tp
    except ImportError:
        raise CaprojError("Torch-Pruning is not installed: pip install -e '.[bench]'") from None
    out = copy.deepcopy(model).eval()
    device = next(out.parameters()).device
    dg = tp.DependencyGraph().build_dependency(out, example_inputs=torch.zeros(1, *input_shape,
                                                                              device=device))
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    mods = dict(out.named_modules())
    for s, k in zip(sites, widths, strict=True):
        if k == s.channels:
            continue
        conv = mods[s.producer]
        fn = tp.prune_conv_out_channels if isinstance(conv, nn.Conv2d) else \
            tp.prune_linear_out_channels
        group = dg.get_pruning_group(conv, fn, idxs=list(range(s.channels)))
        scores = imp(group)
        drop = torch.argsort(scores)[: s.channels - k].tolist()
        dg.get_pruning_group(conv, fn, idxs=drop).prune()
    return out


# ----------------------------------------------------------------------------- registry
METHODS = ("cap", "cp", "pca", "l1", "fpgm", "taylor", "svd", "tp-l2")
# CaP beyond the paper, for the bench: +stream projects the residual streams too, +auto
# chooses per-site widths (caproj.allocate) instead of one uniform ratio.
CAP_VARIANTS = ("cap+stream", "cap+auto", "cap+stream+auto")


def check_methods(methods: list[str]) -> None:
    for m in methods:
        if m not in METHODS + CAP_VARIANTS:
            raise CaprojError(f"unknown method {m!r}; choose from "
                              f"{', '.join(METHODS + CAP_VARIANTS)}")


def run_method(method: str, model: nn.Module, sites: list[Site], widths: list[int],
               splits: Data, mm: MacModel, target: float, cap_cfg: CapConfig | None = None,
               log: Callable[[str], None] = print) -> nn.Module:
    """The compressed network of `method` at these widths (or, for svd, at MACs `target`)."""
    if method == "cap":
        return CaP(model, sites, widths, cap_cfg or CapConfig(), log=log).run(splits)
    if method == "cp":
        cfg = CapConfig(init="select", refit=True, steps=0)
        return CaP(model, sites, widths, cfg, log=log).run(splits)
    if method == "pca":
        cfg = CapConfig(init="pca", refit=False, steps=0)
        return CaP(model, sites, widths, cfg, log=log).run(splits)
    if method in ("l1", "fpgm", "taylor"):
        return prune(model, sites, widths, method, splits)
    if method == "svd":
        return factorise(model, sites, mm, target)
    if method == "tp-l2":
        return torch_pruning_l2(model, sites, widths, splits.input_shape)
    raise CaprojError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
