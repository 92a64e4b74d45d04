"""A timm model through the same API: keep=1.0 is exact, 50 % MACs gives a smaller model that
runs. Random weights (no hub access here); with your trained timm model the code is the same.

    python examples/timm_model.py [--model resnet18d]
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import caproj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18d")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False, num_classes=10).eval()
    images = TensorDataset(torch.randn(128, 3, 64, 64), torch.randint(0, 10, (128,)))
    loader = DataLoader(images, batch_size=32)

    same = caproj.compress(model, loader, keep=1.0, steps=0, progress=False).model
    x = next(iter(loader))[0]
    with torch.no_grad():
        ref = model(x)
        diff = (same(x) - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert diff <= 1e-4, f"keep=1.0 changed the outputs by {diff}"

    res = caproj.compress(model, loader, target_macs=0.5, steps=5, calib_images=128,
                          batch_size=32, progress=False)
    rep = res.report
    with torch.no_grad():
        assert res.model(x).shape == ref.shape
    print(f"timm {a.model}: keep=1.0 exact (rel. diff {diff:.1e}); {len(res.sites)} sites; "
          f"{rep['macs_before'] / 1e6:.1f} -> {rep['macs_after'] / 1e6:.1f} M MACs "
          f"({rep['macs_after'] / rep['macs_before']:.3f}), "
          f"{rep['params_before'] / 1e6:.2f} -> {rep['params_after'] / 1e6:.2f} M params")


if __name__ == "__main__":
    main()
