"""Compression methods as plug-ins over the same sites.

A method is any callable `method(job) -> nn.Module` with a `name` (the `Method` protocol): it
gets a `Job` (the model, the planned sites and widths, calibration images, the training
batches, the CaP settings) and returns the compressed network, built by `surgery` exactly as
for CaP. `register_method(name, method)` adds one to the registry that `caproj.compress(method=
...)`, the CLI and the benchmark read. A channel-scoring function `score(model, site) -> tensor
of site.channels scores (higher = keep)` becomes a method with `Selection(score)`.

Registered:
- `cap`: Cascaded Projection, the full method (caproj.cap);
- `cp`: channel selection + cascaded least-squares reconstruction of the next layer (He et
  al., ICCV 2017); selection by post-nonlinearity energy x consumer weight norm;
- `pca`: PCA projection without optimisation (the CaP ablation);
- `l1`: keep the filters with the largest L1 norm (Li et al., ICLR 2017);
- `fpgm`: drop the filters closest to the geometric median of the layer (He et al., CVPR 2019);
- `taylor`: first-order Taylor importance of each channel, (sum of grad x activation)^2 over
  training batches (Molchanov et al., CVPR 2019); without labels, the original's own top-1
  stands in for the label;
- `svd`: the factorisation family CaP argues against: each conv of a site becomes a k x k conv
  with r filters followed by a 1x1 conv (weight SVD), which adds a layer and activation memory;
- `tp-l2`: Torch-Pruning (DepGraph, CVPR 2023) group-L2 importance, our channel counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from caproj import batches as B
from caproj import projection, surgery
from caproj.budget import solve
from caproj.cap import CaP
from caproj.config import CapConfig
from caproj.errors import CaprojError
from caproj.losses import LossFn, OutputTransform, outputs_of
from caproj.plan import Plan
from caproj.resume import Checkpointer
from caproj.sites import Site


@dataclass
class Job:
    """What a method compresses and with what. `report` collects what the method measured."""

    model: nn.Module
    plan: Plan
    calib: list[torch.Tensor]  # calibration inputs (the first calib_images images, as given)
    data: Iterable | None = None  # training batches (CaP's optimisation, Taylor gradients)
    config: CapConfig = field(default_factory=CapConfig)
    loss_fn: LossFn | None = None
    output_transform: OutputTransform | None = None
    teacher: nn.Module | None = None
    checkpoint: Checkpointer | None = None
    progress: bool = True
    report: dict[str, Any] = field(default_factory=dict)
    # each site's projection (c x width), where the method has one: what factored
    # fine-tuning narrows to (caproj.factored)
    projections: list[torch.Tensor] | None = None

    @property
    def sites(self) -> list[Site]:
        return self.plan.sites

    @property
    def widths(self) -> list[int]:
        assert self.plan.widths is not None
        return self.plan.widths

    @property
    def example_inputs(self) -> torch.Tensor:
        return self.calib[0][:1]


@runtime_checkable
class Method(Protocol):
    """A compression method: `method(job)` returns the compressed nn.Module for `job`'s sites
    and widths (`caproj.Job`); `name` is how the registry, reports and bench call it. A method
    that has projections sets `job.projections`, which factored fine-tuning narrows to."""

    name: str

    def __call__(self, job: Job) -> nn.Module: ...


# ----------------------------------------------------------------------------- CaP family
@dataclass
class CaPMethod:
    """CaP with settings fixed on top of the job's (cp and pca are CaP without optimisation).
    `compress` refuses a user's option that contradicts one of them (`refuse_fixed`)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def __call__(self, job: Job) -> nn.Module:
        cap = CaP(job.model, job.example_inputs, plan=job.plan,
                  config=job.config.replace(**self.overrides), loss_fn=job.loss_fn,
                  output_transform=job.output_transform, teacher=job.teacher,
                  progress=job.progress)
        ck = job.checkpoint
        if ck is not None:
            ck.fingerprint = Checkpointer.encode(cap.fingerprint())
        small = cap.run(job.data if job.data is not None else job.calib, job.calib, ck)
        job.report.update(cap_timings=cap.timings, cap_history=cap.history,
                          cap_config=cap.cfg.as_dict(), label_free=cap.label_free,
                          orthonormality_error=cap.max_orthonormality_error())
        job.projections = [p.detach() for p in cap.projections()]
        return small


def refuse_fixed(method: Method, options: dict[str, Any]) -> None:
    """A CaPMethod fixes some settings (cp: steps 0, the refit): an option the user gave that
    contradicts one is refused rather than silently replaced (`cp` with refit=False used to run
    with the refit). A preset's values are not the user's: the method's win over them."""
    fixed = getattr(method, "overrides", {})
    for k, v in options.items():
        if k in fixed and v != fixed[k]:
            raise CaprojError(f"method {method.name} fixes {k} to {fixed[k]!r}; {k}={v!r} "
                              f"does not apply to it", param=k)


# ----------------------------------------------------------------------------- selection
def producer_filters(model: nn.Module, site: Site) -> torch.Tensor:
    w = dict(model.named_modules())[site.producer].weight.detach()
    return w.reshape(w.shape[0], -1)


def l1_scores(model: nn.Module, site: Site) -> torch.Tensor:
    return producer_filters(model, site).abs().sum(1)


def bn_l2_scores(model: nn.Module, site: Site) -> torch.Tensor:
    """The L2 norm of each filter with its BN folded in: the size of the channel a compactor
    after the BN starts from (ResRep ranks channels by its compactor's row norms)."""
    w = producer_filters(model, site)
    if site.bn is None:
        return w.norm(dim=1)
    bn = dict(model.named_modules())[site.bn]
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # type: ignore[operator]
    return (w * scale[:, None]).norm(dim=1)


def fpgm_scores(model: nn.Module, site: Site) -> torch.Tensor:
    """Sum of distances to all other filters: small = near the geometric median = redundant."""
    w = producer_filters(model, site)
    return torch.cdist(w, w).sum(1)


def selection(scores: list[torch.Tensor], sites: list[Site], widths: list[int]
              ) -> list[torch.Tensor]:
    """Per site: the columns of the identity of its top-`width` channels (P of a pruning)."""
    return [torch.eye(s.channels, device=sc.device) if k == s.channels
            else projection.init_select(sc, k, s.groups)
            for sc, s, k in zip(scores, sites, widths, strict=True)]


@dataclass
class Selection:
    """Channel pruning by a score: keep each site's `width` highest-scoring channels.
    `score(model, site)` returns one number per channel of `site` (higher = keep).
    `finetune`: the fine-tune settings the method implies (TrainConfig fields; a user's own
    override them)."""

    score: Callable[[nn.Module, Site], torch.Tensor]
    name: str = "selection"
    finetune: dict[str, Any] = field(default_factory=dict)

    def __call__(self, job: Job) -> nn.Module:
        scores = []
        for s in job.sites:
            sc = torch.as_tensor(self.score(job.model, s)).detach().float().flatten()
            if sc.numel() != s.channels or not torch.isfinite(sc).all():
                raise CaprojError(f"score for {s.producer} must be {s.channels} finite numbers, "
                                  f"got {sc.numel()}", param="method")
            scores.append(sc.to(job.calib[0].device))
        job.projections = selection(scores, job.sites, job.widths)
        return surgery.apply(job.model, job.sites, job.projections, calib=job.calib)


def taylor_scores(model: nn.Module, sites: list[Site], data: Iterable, batches: int = 16,
                  output_transform: OutputTransform | None = None) -> list[torch.Tensor]:
    """Molchanov et al. 2019, on the BN after each producer (or its output if no BN), over the
    first `batches` batches of `data` (labels, or the model's own top-1 where there are none)."""
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
    B.set_epoch(data, 0)
    try:
        for n, (x, y) in enumerate(B.iterate(data, device)):
            if n == batches:
                break
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = outputs_of(model, x, output_transform)
                target = y if y is not None else out.detach().argmax(1)
                F.cross_entropy(out, target).backward()
            for i in range(len(sites)):
                t = taps[i]
                # d loss / d(channel gate) = sum over positions of grad * activation
                ch = t.dim() - 1 if isinstance(mods[sites[i].producer], nn.Linear) else 1
                g = (t.grad * t).sum(tuple(d for d in range(t.dim()) if d != ch))
                scores[i] += g.pow(2)
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return scores


class Taylor:
    name = "taylor"

    def __call__(self, job: Job) -> nn.Module:
        scores = taylor_scores(job.model, job.sites, job.data if job.data is not None
                               else job.calib, output_transform=job.output_transform)
        job.projections = selection(scores, job.sites, job.widths)
        return surgery.apply(job.model, job.sites, job.projections, calib=job.calib)


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
            if isinstance(mods[n], nn.Conv2d) and mods[n].kernel_size != (1, 1) \
                    and mods[n].groups == 1 and n not in names:
                names.append(n)
    return names


def svd_ranks(mm, model: nn.Module, layers: list[str], target: float) -> list[int]:
    """Ranks for `layers` so the factorised model has `target` MACs within 1 % (`solve`: one
    rank fraction for all layers, then single ranks to the least-kept layer first)."""
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

    return solve([full for full, _, _ in info], macs, target * mm.total,
                 what=f"target_macs {target:g} (svd)")


def factorise(model: nn.Module, sites: list[Site], mm, target: float) -> nn.Module:
    layers = svd_layers(sites, model)
    ranks = svd_ranks(mm, model, layers, target)
    out = copy.deepcopy(model).eval()
    mods = dict(out.named_modules())
    for n, r in zip(layers, ranks, strict=True):
        surgery.set_submodule(out, n, svd_factorise(mods[n], r))  # type: ignore[arg-type]
    return out


class SVD:
    name = "svd"
    uses_widths = False  # ranks of its own, for the same MACs target

    def __call__(self, job: Job) -> nn.Module:
        if job.plan.target_macs is None:
            raise CaprojError("svd factorises to a target_macs budget; keep/widths do not "
                              "apply", param="target_macs")
        return factorise(job.model, job.sites, job.plan.mm, job.plan.target_macs)


# ----------------------------------------------------------------------------- Torch-Pruning
def torch_pruning_l2(model: nn.Module, sites: list[Site], widths: list[int],
                     input_shape: tuple[int, ...]) -> nn.Module:
    """Torch-Pruning (DepGraph, CVPR 2023) group-L2 importance on the same sites and widths:
    its own dependency graph and importance, our channel counts (so MACs match exactly)."""
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


class TorchPruningL2:
    name = "tp-l2"

    def __call__(self, job: Job) -> nn.Module:
        return torch_pruning_l2(job.model, job.sites, job.widths, job.plan.input_shape)


# ----------------------------------------------------------------------------- registry
METHODS: dict[str, Method] = {}
"""The registered methods by name (`register_method` adds yours): cap, cp, pca, l1, fpgm,
taylor, svd, tp-l2, resrep."""


def register_method(name: str, method: Method, *, replace: bool = False) -> None:
    """Make `method` available as `caproj.compress(..., method=name)` and in the benchmark."""
    if not callable(method):
        raise CaprojError(f"method {name!r} must be callable as method(job)", param="method")
    if name in METHODS and not replace:
        raise CaprojError(f"method {name!r} is already registered (pass replace=True)",
                          param="method")
    METHODS[name] = method


def get_method(method: str | Method) -> Method:
    """A registered method by name, or `method` itself if it is a callable plug-in."""
    if isinstance(method, str):
        if method not in METHODS:
            raise CaprojError(f"unknown method {method!r}; choose from {', '.join(METHODS)}",
                              param="method")
        return METHODS[method]
    if callable(method):
        return method
    raise CaprojError(f"method must be a name or a callable, got {type(method).__name__}",
                      param="method")


def method_name(method: str | Method) -> str:
    return method if isinstance(method, str) else getattr(method, "name", type(method).__name__)


for _m in (CaPMethod("cap"), CaPMethod("cp", {"refit": True, "steps": 0}),
           CaPMethod("pca", {"init": "pca", "refit": False, "steps": 0}),
           Selection(l1_scores, "l1"), Selection(fpgm_scores, "fpgm"), Taylor(), SVD(),
           TorchPruningL2(),
           # ResRep (Ding et al. 2021) as caproj runs it: identity compactors after each site's
           # BN, the channels outside the kept ones faded to zero over the first half of the
           # fine-tune (a schedule where ResRep uses masked gradients and group lasso over
           # hundreds of epochs), merged at the end; channels ranked by BN-folded filter norm
           Selection(bn_l2_scores, "resrep", {"factored": True, "factored_ramp": 0.5})):
    register_method(_m.name, _m)
