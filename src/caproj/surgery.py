"""Surgery: turn decided sites into plain, narrower modules.

For a site with projection P (c x c'):
- the producer's BN is folded, the producer becomes P^T W_f (c' filters) and a fresh BN(c')
  carries the bias P^T b_f (re-estimated on calibration data afterwards, see `reestimate_bn`);
- the consumer reads c' channels with weight W_c P (or a refitted weight of that shape).

`compressed_tensors` computes all tensors of the narrow network from the original tensors and
the P matrices, differentiably: CaP optimises through it and the final surgery uses it too, so
the optimised network and the saved one cannot disagree. Module names never change, so a
compressed state_dict loads into the original architecture after `resize_to_state_dict`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from caproj import dist
from caproj.projection import blocks
from caproj.sites import Site, conv_bn_pairs, is_depthwise
from caproj.utils import run_with_hooks


def project_in(w: torch.Tensor, p: torch.Tensor, site: Site, spatial: int | None = None
               ) -> torch.Tensor:
    """Consumer weight reading the projected channels: W P (per spatial slot for Linear; per
    group, with P block-diagonal, for a grouped conv)."""
    if w.dim() == 2:
        w3 = w.reshape(w.shape[0], site.channels, site.spatial if spatial is None else spatial)
        return torch.einsum("ocs,cd->ods", w3, p).reshape(w.shape[0], -1)
    if w.shape[1] != p.shape[0]:  # grouped: output group g reads input group g only
        g = p.shape[0] // w.shape[1]
        wg = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        return torch.einsum("gocij,gcd->godij", wg, blocks(p, g)).reshape(
            w.shape[0], p.shape[1] // g, *w.shape[2:])
    return torch.einsum("ocij,cd->odij", w, p)


def bn_scale(bns: Iterable[nn.Module]) -> torch.Tensor | float:
    """The per-channel slope of BatchNorms in eval mode, applied one after the other."""
    scale: torch.Tensor | float = 1.0
    for m in bns:
        a = torch.rsqrt(m.running_var + m.eps)  # type: ignore[operator]
        scale = scale * (a * m.weight if m.weight is not None else a)
    return scale


def fold_bn(w: torch.Tensor, b: torch.Tensor | None, t: Mapping[str, torch.Tensor], bn: str,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The producer (w, b) with the eval-mode BN `bn` (its tensors in `t`) folded in; a BN
    without affine parameters (affine=False) folds as gamma 1, beta 0."""
    scale = torch.rsqrt(t[f"{bn}.running_var"] + eps)
    if f"{bn}.weight" in t:
        scale = scale * t[f"{bn}.weight"]
    b0 = b if b is not None else torch.zeros_like(scale)
    shape = (-1,) + (1,) * (w.dim() - 1)
    b1 = (b0 - t[f"{bn}.running_mean"]) * scale
    return w * scale.view(shape), b1 + t[f"{bn}.bias"] if f"{bn}.bias" in t else b1


def compressed_tensors(model: nn.Module, sites: list[Site], base: Mapping[str, torch.Tensor],
                       projections: list[torch.Tensor],
                       consumer_weights: Mapping[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """All parameters and buffers of the narrow network (keys as in model.state_dict()).

    base: the original network's tensors (may be trainable copies).
    consumer_weights[name]: a consumer's weight in the original output space and projected
    input space (shape of W_c P), e.g. refitted by least squares; defaults to W_c P.
    """
    mods = dict(model.named_modules())
    out = dict(base)
    for p, s in zip(projections, sites, strict=True):
        for cons, spatial in s.consumers:
            key = f"{cons}.weight"
            if consumer_weights is not None and cons in consumer_weights:
                out[key] = consumer_weights[cons]
            else:
                out[key] = project_in(out[key], p, s, spatial)
    for i, s in enumerate(sites):
        p = projections[i]
        for prod, bn in s.producers:
            w, b = out[f"{prod}.weight"], out.get(f"{prod}.bias")
            if bn:
                eps = mods[bn].eps  # type: ignore[union-attr]
                w, b = fold_bn(w, b, out, bn, eps)
                k = p.shape[1]
                out[f"{bn}.weight"] = torch.ones(k, dtype=w.dtype, device=w.device)
                out[f"{bn}.running_mean"] = torch.zeros(k, dtype=w.dtype, device=w.device)
                out[f"{bn}.running_var"] = torch.full((k,), 1 - eps, dtype=w.dtype,
                                                      device=w.device)
            elif b is None:
                b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            out[f"{prod}.weight"] = _rows(p, w)
            out[f"{bn}.bias" if bn else f"{prod}.bias"] = p.T @ b
            if bn and f"{prod}.bias" in out:  # a conv with its own bias and a BN: the folded
                # bias now lives in the fresh BN, the conv's own is zero at the new width
                out[f"{prod}.bias"] = torch.zeros(p.shape[1], dtype=w.dtype, device=w.device)
        for reader, _ in s.gates:  # squeeze-excitation reading the selected channels
            out[f"{reader}.weight"] = _cols(p, out[f"{reader}.weight"])
        # depthwise convs, BNs and SE writers inside a selection site: their channels are
        # selected (P^T t)
        for m in s.mids + [w for _, w in s.gates]:
            for key in [k for k in out if k.startswith(f"{m}.")]:
                t = out[key]
                if t.dim() >= 1 and t.shape[0] == s.channels and t.is_floating_point():
                    out[key] = _rows(p, t)
    # Fixed channel maps between two streams (option-A shortcuts): E becomes P_out^T E P_in.
    ins = {m: projections[i] for i, s in enumerate(sites) for m in s.maps_out}
    outs = {m: projections[i] for i, s in enumerate(sites) for m in s.maps_in}
    for m in sorted(set(ins) | set(outs)):
        p_in, p_out = ins.get(m), outs.get(m)
        if (p_in is None or p_in.shape[0] == p_in.shape[1]) and \
                (p_out is None or p_out.shape[0] == p_out.shape[1]):
            continue  # both sides whole: the parameter-free original stays exact and free
        ref = p_in if p_in is not None else p_out
        e = mods[m].channel_map().to(ref.device, ref.dtype)  # type: ignore[operator,union-attr]
        if p_in is not None:
            e = e @ p_in
        if p_out is not None:
            e = p_out.T @ e
        out[f"{m}.weight"] = e[:, :, None, None]
    return out


def _rows(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """P^T t along t's first dimension (a selection of rows when P selects)."""
    return (p.T @ t.reshape(t.shape[0], -1)).reshape(-1, *t.shape[1:])


def _cols(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w P along w's second dimension (input channels of a conv/linear)."""
    return torch.einsum("oc...,cd->od...", w, p)


def resize_to_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Replace Conv2d/Linear/BatchNorm2d modules whose stored shapes are narrower (compressed
    checkpoints keep the original module names, only widths change)."""
    for name, m in list(model.named_modules()):
        w = sd.get(f"{name}.weight", sd.get(f"{name}.running_mean"))
        if w is None:
            continue
        has_bias = f"{name}.bias" in sd
        new: nn.Module | None = None
        if isinstance(m, nn.Conv2d) and (tuple(w.shape) != tuple(m.weight.shape)
                                         or has_bias != (m.bias is not None)):
            groups = w.shape[0] if is_depthwise(m) else m.groups  # depthwise stays depthwise
            new = nn.Conv2d(w.shape[1] * groups, w.shape[0], m.kernel_size, m.stride, m.padding,
                            m.dilation, groups, bias=has_bias, padding_mode=m.padding_mode)
        elif isinstance(m, nn.Linear) and (tuple(w.shape) != tuple(m.weight.shape)
                                           or has_bias != (m.bias is not None)):
            new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                w.shape[0] != m.num_features or m.affine != (f"{name}.weight" in sd)):
            # a fresh BN holds a folded bias: affine even where the original was not
            new = type(m)(w.shape[0], m.eps, m.momentum, affine=f"{name}.weight" in sd)
        elif hasattr(m, "channel_map") and (m.weight is None or m.weight.shape != w.shape):
            m.weight = nn.Parameter(torch.empty_like(w))  # a projected fixed channel map
        if new is not None:
            set_submodule(model, name, new.to(w.device))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def narrow_like(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` whose layers have the shapes of `tensors` (values not loaded)."""
    narrow = copy.deepcopy(model)
    resize_to_state_dict(narrow, tensors)
    return narrow.to(next(iter(tensors.values())).device)


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    # contiguous: einsum/matmul results can carry odd strides, which slow convolutions down
    sd = model.state_dict()  # keeps num_batches_tracked etc. and the per-module versions that
    for k, v in tensors.items():  # some modules' loaders read (torchvision's MNASNet)
        sd[k] = v.detach().contiguous().clone()
    model.load_state_dict(sd)
    return model


@torch.no_grad()
def reestimate_bn(model: nn.Module, sites: list[Site], batches: Iterable[torch.Tensor]) -> None:
    """Give each site's fresh BN real running statistics without changing the eval function:
    with the producer output y, BN(y) = y + beta before; afterwards mean m, var v,
    gamma = sqrt(v + eps), beta' = beta + m, so BN(y) = y + beta still, and fine-tuning starts
    from properly normalised activations."""
    mods = dict(model.named_modules())
    todo = [(p, bn) for s in sites for p, bn in s.producers if bn]
    acc = {bn: [0.0, 0.0, 0] for _, bn in todo}
    hooks = []
    for prod, bn in todo:
        def hook(m, i, o, key=bn):
            o = o.detach().float()
            dims = [d for d in range(o.dim()) if d != 1]
            a = acc[key]
            a[0] = a[0] + o.sum(dims)
            a[1] = a[1] + o.pow(2).sum(dims)
            a[2] += o.numel() // o.shape[1]
        hooks.append(mods[prod].register_forward_hook(hook))
    run_with_hooks(model, batches, hooks)
    for _, name in todo:
        bn: nn.BatchNorm2d = mods[name]  # type: ignore[assignment]
        s1, s2, n = acc[name]
        if dist.world() > 1:  # torchrun: every rank saw its share of the calibration batches
            s1 = dist.all_reduce_(torch.as_tensor(s1, dtype=torch.float32,
                                                  device=bn.weight.device).clone())
            s2 = dist.all_reduce_(torch.as_tensor(s2, dtype=torch.float32,
                                                  device=bn.weight.device).clone())
            n = int(dist.all_reduce_(torch.tensor([float(n)], dtype=torch.float64,
                                                  device=bn.weight.device)).item())
        if n == 0:
            continue
        m = s1 / n
        v = (s2 / n - m * m).clamp_min(0)
        bn.running_mean.copy_(m)
        bn.running_var.copy_(v)
        bn.weight.copy_(torch.sqrt(v + bn.eps))
        bn.bias.add_(m)


def selected_channels(p: torch.Tensor) -> torch.Tensor | None:
    """The original channel each column of P keeps, if P is a channel selection (one 1 per
    column, zeros elsewhere) that drops something; else None."""
    if p.shape[0] == p.shape[1] or not bool(((p == 0) | (p == 1)).all()) \
            or not bool((p.sum(0) == 1).all()):
        return None
    return p.argmax(0)


@torch.no_grad()
def restore_pruned_form(model: nn.Module, original: nn.Module, sites: list[Site],
                        projections: list[torch.Tensor],
                        calib: Iterable[torch.Tensor] | None = None) -> list[str]:
    """Give every channel a selection kept its original filter (unfolded: its input side stays
    as the method left it, a refit included), bias and BN (weight, bias and running
    statistics), as pruning keeps them, instead of the folded filter and the fresh BN that
    reproduce the compressed network's function; consumers keep what the method gave them.
    The function changes: a BN in training mode then puts each kept channel back at its
    original scale and shift (gamma, beta) whatever its new input statistics.
    With `calib`, every BN's running statistics are then re-estimated on those images.
    Returns the producers restored (projections that are not selections are left alone)."""
    om, mods = dict(original.named_modules()), dict(model.named_modules())
    done = []
    for s, p in zip(sites, projections, strict=True):
        keep = selected_channels(p)
        if keep is None:
            continue
        for prod, bn in s.producers:
            if not bn:
                continue
            keep = keep.to(mods[prod].weight.device)
            obn = om[bn]
            scale = bn_scale([obn])[keep]  # type: ignore[index]
            scale = torch.where(scale.abs() > 1e-12, scale, torch.ones_like(scale))
            w = mods[prod].weight  # the folded row: (its input side as the method left it) x scale
            w.div_(scale.reshape(-1, *([1] * (w.dim() - 1))).to(w))
            if mods[prod].bias is not None:
                mods[prod].bias.copy_(om[prod].bias[keep])
            if not obn.affine and mods[bn].weight is not None:  # the original's identity
                mods[bn].weight.fill_(1.0)  # type: ignore[union-attr]
                mods[bn].bias.zero_()  # type: ignore[union-attr]
            for k, t in list(obn.named_parameters()) + list(obn.named_buffers()):
                if t.dim() >= 1 and t.shape[0] == s.channels:
                    getattr(mods[bn], k).copy_(t[keep])
            done.append(prod)
    if calib is not None and done:
        recalibrate_bn(model, calib)
    return done


@torch.no_grad()
def match_weight_scale(model: nn.Module, original: nn.Module,
                       pairs: list[tuple[str, str]] | None = None) -> dict[str, float]:
    """Rescale each conv (or Linear) that feeds a BN to the root-mean-square size of the same
    layer in `original`, moving the scale into that BN's running statistics, so the eval
    function stays the same (exactly: the BN's weight absorbs its eps term).

    Why: behind a BN in training mode a layer's output does not depend on its weights' scale,
    but SGD's step relative to the weights does (effective learning rate ~ lr / |W|^2, and weight
    decay acts on |W|). CaP's folded producers come out 0.2-0.4x and its least-squares-refitted
    consumers 1.3-7x the original size (ResNet-56, RESULTS.md), so fine-tuning a fresh CaP
    network with the original's recipe over-steps the ones and under-steps the others.
    That holds for BN in training mode only: behind a frozen BN (running statistics) a layer
    shrunk by r steps r^2 further relative to its weights, so `compress` skips this when its
    fine-tuning freezes BN.

    pairs: (layer, BN) names, default `caproj.sites.conv_bn_pairs(model)`; layers whose shape
    or size is unchanged are left alone. Returns {layer: size ratio before rescaling}.

    (One ratio per layer: rescaling each filter to its own original size instead did not
    change the end of fine-tuning, benchmarks/RESULTS.md, "Which channels, which form".)"""
    om, mods = dict(original.named_modules()), dict(model.named_modules())
    ratios: dict[str, float] = {}
    for name, bn_name in conv_bn_pairs(model) if pairs is None else pairs:
        ref = getattr(om.get(name), "weight", None)
        w = mods[name].weight
        if not isinstance(ref, torch.Tensor) or ref.dim() != w.dim():
            continue
        r = float(w.detach().float().pow(2).mean().sqrt()
                  / ref.detach().float().pow(2).mean().sqrt().clamp_min(1e-30))
        if not (r > 0 and abs(r - 1) > 1e-6 and r < float("inf")):
            continue
        ratios[name] = r
        w.div_(r)
        if mods[name].bias is not None:
            mods[name].bias.div_(r)
        bn: nn.BatchNorm2d = mods[bn_name]  # type: ignore[assignment]
        if bn.running_mean is None or bn.running_var is None:
            continue  # normalised by batch statistics: scale-free already
        v = bn.running_var.clone()
        bn.running_mean.div_(r)
        bn.running_var.div_(r * r)
        if bn.weight is not None:  # gamma / sqrt(v + eps) stays what it was
            bn.weight.mul_(torch.sqrt(v + bn.eps * r * r) / torch.sqrt(v + bn.eps))
        else:  # no affine weight: fold the eps term into the variance (clamped at 0)
            bn.running_var.copy_(((v + bn.eps) / (r * r) - bn.eps).clamp_min(0))
    return ratios


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BN's running statistics by those of this network's own features (a
    cumulative average over the calibration batches); affine parameters are kept."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, (mom, tr) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.train(tr)


def apply(model: nn.Module, sites: list[Site], projections: list[torch.Tensor],
          calib: Iterable[torch.Tensor] | None = None,
          consumer_weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Surgery as one call: the narrow nn.Module for these sites and projections."""
    base = {k: v.detach() for k, v in model.state_dict().items()}
    t = compressed_tensors(model, sites, base, [p.detach() for p in projections],
                           consumer_weights)
    narrow = load_tensors(narrow_like(model, t), t)
    if calib is not None:
        reestimate_bn(narrow, sites, calib)
    return narrow.eval()
