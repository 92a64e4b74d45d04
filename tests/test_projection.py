"""Initial projections: the reconstruction-greedy selection (`init="recon"`)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

import caproj
from caproj.projection import init_recon, init_select


def refit_error(x: torch.Tensor, w: torch.Tensor, keep: list[int]) -> float:
    """The consumer's output error after a least-squares refit from the kept channels."""
    y = x @ w.T
    sol = torch.linalg.lstsq(x[:, keep], y).solution
    return float((x[:, keep] @ sol - y).pow(2).sum())


def kept(p: torch.Tensor) -> list[int]:
    return p.argmax(0).tolist()


def test_recon_drops_a_duplicate_that_energy_keeps():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(400, generator=g) for _ in range(3))
    x = torch.stack([3 * a, 3 * a + 1e-3 * b, b, c], 1).double()  # channel 1 repeats channel 0
    w = torch.randn(5, 4, generator=g).double()
    energy = x.pow(2).mean(0) * w.pow(2).sum(0)
    by_energy = kept(init_select(energy, 3))
    by_recon = kept(init_recon(x.T @ x, w, 3))
    assert {0, 1} <= set(by_energy)  # the score keeps both copies and drops real information
    assert not {0, 1} <= set(by_recon)
    best = min(refit_error(x, w, list(s)) for s in itertools.combinations(range(4), 3))
    assert refit_error(x, w, by_recon) <= best * (1 + 1e-6) + 1e-9
    assert refit_error(x, w, by_recon) < 1e-3 * refit_error(x, w, by_energy)


def test_recon_never_refits_worse_than_energy_on_random_correlated_channels():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(600, 12, generator=g) @ torch.randn(12, 12, generator=g)).double()
        w = torch.randn(6, 12, generator=g).double()
        energy = x.pow(2).mean(0) * w.pow(2).sum(0)
        for k in (3, 6, 9):
            assert refit_error(x, w, kept(init_recon(x.T @ x, w, k))) <= \
                refit_error(x, w, kept(init_select(energy, k))) * (1 + 1e-9)


def test_compress_with_recon_init_keeps_one_exact_and_records_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    data = [(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))) for _ in range(4)]
    x = data[0][0]
    kw = {"steps": 0, "preset": None, "calib_images": 128, "progress": False, "init": "recon"}
    with torch.no_grad():
        ref = model(x)
        same = caproj.compress(model, data, keep=1.0, **kw).model
        assert (same(x) - ref).abs().max() <= 1e-4
        res = caproj.compress(model, data, keep=0.5, **kw)
        assert res.model(x).shape == ref.shape
    assert res.widths == [8, 8] and res.report["cap_config"]["init"] == "recon"
