"""Data-free calibration images, synthesised from the model itself.

A trained network's BatchNorm layers remember the mean and variance of the features real images
produce. `synthesize(model, n)` starts from Gaussian noise in the model's input space and
optimises the images (Adam, cosine-decayed) so that, batch by batch, every BN layer sees batch
statistics equal to its running ones (DeepInversion, Yin et al. 2020; ZeroQ, Cai et al. 2020):

    loss = bn_weight * sum_l w_l (||mu_l(x) - running_mean_l|| + ||var_l(x) - running_var_l||)
         + ce_weight * CE(model(x), t)          # logit prior: a balanced set of random classes t
         + tv_weight * TV(x) + l2_weight * mean(x^2)   # image priors

with a random shift and flip of the whole batch at every step (so the images cannot rely on
pixel-exact alignment) and w_l = first_bn_weight for the first BN, 1 for the others. The result
is a `Synthetic` dataset of float images, ready for the model as they are (no normalisation),
with a record of the BN loss before and after every batch.

Batch k is seeded by (seed, k) alone, so a run resumed from its state file (written after every
finished batch) and an uninterrupted one give the same images; `cache=True` keeps the finished
set on disk, keyed by the model's weights, the settings and n, so a second job reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caproj.config import SynthConfig
from caproj.data import Batches
from caproj.data import cache_dir as data_cache_dir
from caproj.errors import CaprojError
from caproj.losses import OutputTransform, outputs_of
from caproj.resume import Checkpointer
from caproj.train import bf16_supported, model_device
from caproj.train import progress as progress_bar
from caproj.utils import atomic_save

log = logging.getLogger(__name__)

__all__ = ["Synthetic", "synthesize", "bn_statistics_loss"]


class Synthetic(torch.utils.data.Dataset):
    """Synthesised images (N×C×H×W float, model inputs as they are) and how they were made.
    A Dataset (item i is image i); `batches` iterates them for caproj's loops."""

    def __init__(self, images: torch.Tensor, report: dict[str, Any]) -> None:
        self.images, self.report = images, report

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def batches(self, batch_size: int, *, train: bool = False, seed: int = 0,
                device: torch.device | str = "cpu") -> Batches:
        """Bare image batches (label-free). `train`: shuffled, with random shifts (zero
        padding, 1/8 of the side) and flips, fresh per epoch, as CaP's steps and fine-tuning
        re-use a small set; otherwise in order, unaugmented (calibration)."""
        side = self.images.shape[-1]
        return Batches(self.images, None, batch_size, None, None, train=train,
                       crop_padding=max(1, side // 8) if train else 0, flip=train, seed=seed,
                       device=device, drop_last=train)


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


class _StatsHooks:
    """Forward pre-hooks collecting each BN's distance to its running statistics."""

    def __init__(self, layers: list[nn.modules.batchnorm._BatchNorm],
                 first_weight: float) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_pre_hook(self._hook(first_weight if i == 0 else 1.0))
                        for i, m in enumerate(layers)]

    def _hook(self, weight: float):
        def hook(mod: nn.modules.batchnorm._BatchNorm, args: tuple) -> None:
            x = args[0]
            # channels last as rows: (N*H*W, C); centred on the running mean, so the moments
            # need no float copy of the activations and do not cancel once they match
            xc = x.movedim(1, -1).reshape(-1, x.shape[1]) - mod.running_mean.to(x.dtype)
            ones = xc.new_ones(1, xc.shape[0]) / xc.shape[0]
            m1 = (ones @ xc).float().squeeze(0)
            var = (ones @ (xc * xc)).float().squeeze(0) - m1 * m1
            t = torch.linalg.vector_norm(m1) + torch.linalg.vector_norm(var - mod.running_var)
            self.terms.append(t * weight)
        return hook

    def take(self) -> torch.Tensor:
        out = torch.stack(self.terms).sum()
        self.terms = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def bn_statistics_loss(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean over batches of sum_l (||mu_l - running_mean_l|| + ||var_l - running_var_l||): how
    far a set of images is from what the model's BatchNorm layers saw in training."""
    layers = _bn_layers(model)
    if not layers:
        raise CaprojError("the model has no BatchNorm layers with running statistics to "
                          "match", param="model")
    was = model.training
    model.eval()
    hooks = _StatsHooks(layers, 1.0)
    dev = model_device(model)
    tot, k = 0.0, 0
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(dev))
            tot += float(hooks.take())
            k += 1
    finally:
        hooks.remove()
        model.train(was)
    return tot / max(k, 1)


def _tv(x: torch.Tensor) -> torch.Tensor:
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + \
        ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


def _fingerprint(model: nn.Module, n: int, shape: tuple[int, ...], cfg: SynthConfig) -> str:
    h = hashlib.sha256(repr((n, shape, sorted(cfg.as_dict().items()))).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b"")
    return h.hexdigest()[:20]


def synthesize(model: nn.Module, n: int, input_shape: tuple[int, ...] | torch.Size, *,
               num_classes: int | None = None, output_transform: OutputTransform | None = None,
               state_path: str | os.PathLike | None = None, resume: bool = False,
               cache: bool = False, progress: bool = True,
               config: SynthConfig | None = None, **options: Any) -> Synthetic:
    """`n` images of `input_shape` (C, H, W) synthesised from `model`'s BatchNorm statistics
    (module doc). `**options` override `caproj.config.SynthConfig` fields (steps, batch_size,
    lr, ce_weight, seed, ...). `num_classes`: of the logit prior (default: the model's output
    width). `state_path`: save `<state_path>.synth-state.pt` after every finished batch (and on
    SIGTERM/SIGINT, at the end of the batch); `resume=True` continues from it. `cache`: keep
    the finished set in caproj's cache dir and reuse it. `progress`: a bar on a terminal.
    The model is left as it was."""
    shape, layers = _checked(model, n, input_shape)
    cfg = (config or SynthConfig()).replace(**options)
    key = _fingerprint(model, n, shape, cfg) if cache or state_path is not None else None
    cached = data_cache_dir() / "synthetic" / f"{key}.pt"
    if cache and (hit := _from_cache(cached)) is not None:
        return hit
    dev = model_device(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = outputs_of(model, torch.zeros(2, *shape, device=dev), output_transform)
    classes = num_classes or out.shape[-1]
    ck = Checkpointer(f"{state_path}.synth-state.pt" if state_path is not None else None,
                      {"synth": cfg.as_dict(), "n": n, "shape": shape, "model": key}, 1, resume)
    st = ck.load()
    done: list[torch.Tensor] = list(st["images"].split(cfg.batch_size)) if st else []
    batches: list[dict[str, Any]] = list(st["batches"]) if st else []
    sizes = [min(cfg.batch_size, n - i) for i in range(0, n, cfg.batch_size)]
    params = [p for p in model.parameters()]
    req = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    hooks = _StatsHooks(layers, cfg.first_bn_weight)
    try:
        for k in progress_bar(range(len(done), len(sizes)), len(sizes) - len(done),
                              "synthesising", progress):
            x, rec = _one_batch(model, hooks, sizes[k], shape, classes, cfg, k, dev,
                                output_transform)
            done.append(x)
            batches.append(rec)
            log.info("synthetic batch %d/%d: BN loss %.3f -> %.3f, prior %.3f (%.0f s)", k + 1,
                     len(sizes), rec["bn_loss_start"], rec["bn_loss_end"], rec["ce_end"],
                     rec["seconds"])
            if ck.due(k + 1):
                ck.save(k + 1, {"images": torch.cat(done), "batches": batches})
    finally:
        hooks.remove()
        for p, r in zip(params, req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    images = torch.cat(done)
    report = {"n": n, "input_shape": list(shape), "classes": classes, "config": cfg.as_dict(),
              "seconds": sum(b["seconds"] for b in batches),
              **{k: sum(b[k] * b["n"] for b in batches) / n
                 for k in ("bn_loss_start", "bn_loss_end")}, "batches": batches}
    if cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"images": images, "report": report}, cached)
    ck.finish()
    return Synthetic(images, report)


def _checked(model: nn.Module, n: int, input_shape: tuple[int, ...] | torch.Size
             ) -> tuple[tuple[int, ...], list[nn.modules.batchnorm._BatchNorm]]:
    """synthesize's arguments checked: (the shape as ints, the BatchNorms to match)."""
    if not isinstance(model, nn.Module):
        raise CaprojError(f"model must be an nn.Module, got {type(model).__name__}",
                          param="model")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CaprojError(f"the number of synthetic images must be an integer >= 1, got {n}",
                          param="synthetic")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise CaprojError(f"input_shape must be (C, H, W), got {tuple(input_shape)}",
                          param="input_shape")
    layers = _bn_layers(model)
    if not layers:
        raise CaprojError("data-free synthesis matches BatchNorm running statistics, and the "
                          "model has no BatchNorm layer that tracks them; pass real (even "
                          "unlabeled) images instead", param="model")
    return shape, layers


def _from_cache(cached: Path) -> Synthetic | None:
    """A finished set from caproj's cache; None if absent or corrupt (then it is removed)."""
    if not cached.is_file():
        return None
    try:
        d = torch.load(cached, weights_only=True)
        hit = Synthetic(d["images"], d["report"])
    except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt, never trusted
        cached.unlink(missing_ok=True)
        return None
    log.info("synthetic images: %d from the cache (%s)", len(hit.images), cached)
    return hit


def _one_batch(model: nn.Module, hooks: _StatsHooks, size: int, shape: tuple[int, ...],
               classes: int, cfg: SynthConfig, k: int, dev: torch.device,
               output_transform: OutputTransform | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Batch k, a pure function of (cfg.seed, k): images on the CPU and their record."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
    x = torch.randn(size, *shape, generator=g).to(dev).requires_grad_(True)
    targets = (torch.arange(size) % classes)[torch.randperm(size, generator=g)].to(dev)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    shift = int(round(cfg.jitter * shape[-1]))
    bf16 = bf16_supported(dev) if cfg.bf16 is None else cfg.bf16
    t0 = time.perf_counter()

    def measure() -> tuple[float, float, float]:
        """BN loss, prior and the share of images the model puts in their target class."""
        with torch.no_grad():
            logits = outputs_of(model, x, output_transform)
            return (float(hooks.take()), float(F.cross_entropy(logits, targets)),
                    float((logits.argmax(-1) == targets).float().mean()))

    bn0, ce0, _ = measure()
    for _ in range(cfg.steps):
        xi = x
        if shift:
            dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
            xi = torch.roll(xi, shifts=(dy, dx), dims=(2, 3))
        if cfg.flip and bool(torch.rand(1, generator=g) < 0.5):
            xi = xi.flip(3)
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            logits = outputs_of(model, xi.contiguous(memory_format=torch.channels_last),
                                output_transform).float()
        loss = cfg.bn_weight * hooks.take() + cfg.ce_weight * F.cross_entropy(logits, targets) \
            + cfg.tv_weight * _tv(xi) * shape[-1] * shape[-2] / 1024 \
            + cfg.l2_weight * (xi ** 2).mean()
        if not torch.isfinite(loss):
            raise CaprojError(f"synthesis diverged (loss {float(loss)}) in batch {k}; lower lr "
                              f"(now {cfg.lr})", param="lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    x = x.detach()
    bn1, ce1, hit = measure()
    rec = {"batch": k, "n": size, "bn_loss_start": bn0, "bn_loss_end": bn1, "ce_start": ce0,
           "ce_end": ce1, "target_hit": hit, "seconds": time.perf_counter() - t0}
    return x.cpu(), rec
