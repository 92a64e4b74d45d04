"""Tracing forwards that branch on their input: on the shapes (traced on the example batch,
as Hugging Face models need), never on tensor values (refused in one line)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import caproj
from caproj.sites import find_sites, traced_on


class ChecksShape(nn.Module):
    """Branches on the input's shape, as `transformers` models check `pixel_values`."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        h = self.b(self.a(x))
        if h.size(-1) > 4:  # a size-dependent pooling choice
            h = nn.functional.adaptive_avg_pool2d(h, 1)
        return self.head(h.flatten(1))


class ChecksValues(ChecksShape):
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.a(x)
        if h.mean() > 0:  # a branch on the batch's values: no graph holds for every batch
            h = self.b(h)
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g))
            for _ in range(2)]


def test_a_forward_that_branches_on_shapes_traces_on_the_example():
    torch.manual_seed(0)
    model = ChecksShape().eval()
    with pytest.raises(caproj.CaprojError, match="cannot trace ChecksShape"):
        find_sites(model)  # torch.fx alone refuses it
    with traced_on(torch.randn(2, 3, 8, 8)):
        assert [s.producer for s in find_sites(model).sites] == ["a.0", "b.0"]
    x = data()[0][0]
    kw = {"steps": 0, "preset": None, "calib_images": 16, "progress": False}
    with torch.no_grad():
        ref = model(x)
        same = caproj.compress(model, data(), keep=1.0, **kw).model
        assert (same(x) - ref).abs().max() <= 1e-5
        small = caproj.compress(model, data(), keep=0.5, **kw).model
        assert small(x).shape == ref.shape and small.a[0].out_channels == 8


def test_a_forward_that_branches_on_values_is_refused_in_one_line():
    model = ChecksValues().eval()
    with pytest.raises(caproj.CaprojError) as e:
        caproj.compress(model, data(), keep=0.5, steps=0, preset=None, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "cannot trace ChecksValues" in msg and "tensor values" in msg


def test_the_cap_class_traces_such_a_forward_on_its_own_inputs():
    """Through `caproj.CaP` and `Plan.of` directly (no `compress` to set the example): the plan
    traces on zeros of the input shape, the refit on the calibration batch."""
    torch.manual_seed(0)
    model = ChecksShape().eval()
    x = data()[0][0]
    cap = caproj.CaP(model, x, keep=0.5, steps=0, calib_images=16, progress=False)
    cap.calibrate([b for b, _ in data()])
    small = cap.finalize()
    with torch.no_grad():
        assert small(x).shape == model(x).shape and small.b[0].out_channels == 8

