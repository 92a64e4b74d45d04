"""Which models caproj can compress: sites found, keep=1.0 exactness, MACs at half width.

`check(name)` builds a torchvision classifier with random weights and non-trivial BatchNorm
statistics, finds its sites and, if there are any, runs surgery with identity projections
(keep=1.0) and compares the logits with the original's, then predicts the MACs when every site
keeps half its channels. A model without sites is refused with the first layer and the pattern
that stops it. scripts/torchvision_coverage.py turns this into the README's table; the tests run
it on every supported model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caproj.errors import CaprojError

# Models that only run at (or near) their native resolution (fixed positional embeddings,
# windows, or too many stride-2 valid convolutions);
# everything else is checked at SMALL to keep the check fast.
NATIVE_224 = ("vit_", "swin_", "maxvit_", "inception_v3")
SMALL = 64


@dataclass
class Coverage:
    model: str
    input_size: int
    sites: int
    producers: int  # Conv2d/Linear layers in the graph
    exact: bool | None  # None: refused, not checked
    max_diff: float | None
    macs_half: float | None  # MACs fraction with every site at half width
    reason: str = ""


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


def check(name: str, num_classes: int = 10, seed: int = 0) -> Coverage:
    """The coverage row of one model; a crash is a row too (exact=False), never an exception."""
    try:
        return _check(name, num_classes, seed)
    except Exception as e:  # reported in the table and failed by the tests
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return Coverage(name, input_size_of(name), 0, 0, False, None, None,
                        f"crashed: {type(e).__name__}: {first}")


@torch.no_grad()
def _check(name: str, num_classes: int, seed: int) -> Coverage:
    from caproj import surgery
    from caproj.budget import MacModel, predict_macs, widths_for_keep
    from caproj.models import build_model
    from caproj.sites import PRODUCERS, find_sites, require_sites

    torch.manual_seed(seed)
    size = input_size_of(name)
    model = randomise_bn(build_model(f"tv:{name}", num_classes))
    producers = sum(isinstance(m, PRODUCERS) for m in model.modules())
    try:
        sites = require_sites(model)
    except CaprojError as e:
        return Coverage(name, size, 0, producers, None, None, None, str(e))
    n_skipped = len(find_sites(model).skipped)
    shape = (3, size, size)
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(4, *shape, generator=g)]
    same = surgery.apply(model, sites, [torch.eye(s.channels) for s in sites], calib=calib)
    x = torch.randn(2, *shape, generator=g)
    ref, out = model(x), same(x)
    diff = (out - ref).abs().max().item()
    exact = diff <= 1e-4 * max(1.0, ref.abs().max().item())
    mm = MacModel.of(model, shape)
    half = predict_macs(mm, sites, widths_for_keep(sites, 0.5)) / mm.total
    return Coverage(name, size, len(sites), producers, exact, diff, half,
                    f"{n_skipped} producers are not sites" if n_skipped else "")
