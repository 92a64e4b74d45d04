"""Which models caproj can compress.

- `run(arch)`: a real run through `caproj.compress`, as a user would: the model (random weights,
  non-trivial BatchNorm statistics) is compressed at keep=1.0 and its logits compared with the
  original's, then compressed to 50 % of its MACs with a short CaP optimisation, the result run
  and its MACs counted. A model is refused up front (one line naming the layer and pattern) or
  compresses; a crash at any stage is a row too, never an exception.
  `scripts/coverage.py --zoo timm|tv` writes the README's tables from these runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from caproj.errors import CaprojError

# Models that only run at (or near) their native resolution (fixed positional embeddings,
# windows, or too many stride-2 valid convolutions);
# everything else is checked at SMALL to keep the check fast.
NATIVE_224 = ("vit_", "swin_", "maxvit_", "inception_v3")
SMALL = 64


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def input_size_of(name: str) -> int:
    return 224 if name.startswith(NATIVE_224) else SMALL


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines, so folding and re-estimation are exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


@dataclass
class RealRun:
    model: str  # arch spec: tv:<name>, timm:<name>, or a zoo name
    input_size: int
    sites: int
    producers: int  # Conv2d/Linear layers in the model
    exact: bool | None  # keep=1.0 logits equal the original's (None: refused)
    max_diff: float | None  # relative to the logits' scale
    macs_reached: float | None  # MACs fraction of the model compressed for `target`
    runs: bool | None  # that model's forward gives finite logits of the right shape
    seconds: float
    reason: str = ""
    floor: float | None = None  # MACs fraction left with every site at its narrowest width
    selection_sites: int = 0  # sites through depthwise convs / SE gates (selection P)
    grouped_sites: int = 0  # sites with grouped convs (block-diagonal P)


def run(arch: str, input_size: int = SMALL, target: float = 0.5, steps: int = 2,
        seed: int = 0, device: str | torch.device = "cpu") -> RealRun:
    """One coverage row from real runs of `caproj.compress` (see the module docstring)."""
    t0 = time.perf_counter()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # exactness is judged in float32: TensorFloat-32 alone differs by ~1e-3 on CUDA
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        return _run(arch, input_size, target, steps, seed, t0, torch.device(device))
    except Exception as e:  # reported in the table and failed by the tests
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return RealRun(arch, input_size, 0, 0, False, None, None, False,
                       time.perf_counter() - t0, f"crashed: {type(e).__name__}: {first}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _run(arch: str, size: int, target: float, steps: int, seed: int, t0: float,
         device: torch.device) -> RealRun:
    from torch.utils.data import DataLoader, TensorDataset

    from caproj.api import compress
    from caproj.budget import MacModel, predict_macs, site_units
    from caproj.models import build_model
    from caproj.sites import PRODUCERS, find_sites

    torch.manual_seed(seed)
    model = randomise_bn(build_model(arch, num_classes=1000)).to(device)
    producers = sum(isinstance(m, PRODUCERS) for m in model.modules())
    g = torch.Generator().manual_seed(seed)
    data = DataLoader(TensorDataset(torch.randn(8, 3, size, size, generator=g).to(device),
                                    torch.randint(0, 1000, (8,), generator=g).to(device)),
                      batch_size=4)
    x = torch.randn(2, 3, size, size, generator=g).to(device)
    try:
        same = compress(model, data, preset=None, keep=1.0, steps=0, calib_images=8, progress=False)
    except CaprojError as e:
        return RealRun(arch, size, 0, producers, None, None, None, None,
                       time.perf_counter() - t0, str(e))
    n_sites = len(same.sites)
    mm = MacModel.of(model, (3, size, size))
    floor = predict_macs(mm, same.sites, site_units(same.sites)) / mm.total
    kinds = {"floor": floor, "selection_sites": sum(s.selection for s in same.sites),
             "grouped_sites": sum(s.groups > 1 for s in same.sites)}
    with torch.no_grad():
        ref = model(x)
        diff = ((same.model(x) - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    reason = ""
    n_skipped = len(find_sites(model).skipped)
    if n_skipped:
        reason = f"{n_skipped} producers are not sites"
    try:
        res = compress(model, data, preset=None, target_macs=target, steps=steps, calib_images=8,
                       batch_size=4, progress=False)
    except CaprojError as e:
        return RealRun(arch, size, n_sites, producers, diff <= 1e-4, diff, None, None,
                       time.perf_counter() - t0, f"{target:g} MACs: {e}", **kinds)
    with torch.no_grad():
        out = res.model(x)
    ok = tuple(out.shape) == tuple(ref.shape) and bool(torch.isfinite(out).all())
    reached = res.report["macs_after"] / res.report["macs_before"]
    return RealRun(arch, size, n_sites, producers, diff <= 1e-4, diff, reached, ok,
                   time.perf_counter() - t0, reason, **kinds)
