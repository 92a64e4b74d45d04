"""Automatic per-site allocation (--allocate auto): meets the MACs budget within 1 %, spends it
where the measured damage per MAC is largest, keeps everything at target 1.0 (exact), and the
chosen widths reach the checkpoint."""

import pytest
import torch
from test_cap import batches, randomise_bn
from torch import nn

from caproj.allocate import allocate, site_profiles
from caproj.budget import MacModel, predict_macs
from caproj.config import CapConfig
from caproj.errors import CaprojError
from caproj.models import build_model
from caproj.sites import Site, require_sites

from conftest import caproj, make_cap


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    model = randomise_bn(build_model("resnet20"))
    sites = require_sites(model)
    calib = batches((3, 32, 32), n=2, bs=16)
    curves, sens = site_profiles(model, sites, calib, sensitivity_images=16)
    return model, sites, MacModel.of(model, (3, 32, 32)), curves, sens, calib


def test_profiles_are_decreasing_spectra_and_positive_sensitivities(r20):
    _, sites, _, curves, sens, _ = r20
    for s, c in zip(sites, curves, strict=True):
        assert len(c) == s.channels + 1 and c[0] == pytest.approx(1) and c[-1] == pytest.approx(0)
        assert (c[1:] <= c[:-1] + 1e-6).all()
    assert all(v > 0 for v in sens)


@pytest.mark.parametrize("target", [0.7, 0.5, 0.35])
def test_allocation_meets_the_macs_target_within_one_percent(r20, target):
    _, sites, mm, curves, sens, _ = r20
    widths = allocate(mm, sites, curves, sens, target)
    got = predict_macs(mm, sites, widths) / mm.total
    assert 0.99 * target <= got <= target
    assert all(1 <= k <= s.channels for k, s in zip(widths, sites, strict=True))


def test_target_one_keeps_every_channel_and_is_exact(r20):
    model, sites, mm, curves, sens, calib = r20
    widths = allocate(mm, sites, curves, sens, 1.0)
    assert widths == [s.channels for s in sites]
    cap = make_cap(model, sites, widths, CapConfig(steps=0, log_every=0), (3, 32, 32))
    cap.calibrate(calib)
    out = cap.finalize()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert (out(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_budget_goes_to_the_sensitive_site():
    # two identical sites of equal cost; only their sensitivity differs
    sites = [Site("a", "a2", 32), Site("b", "b2", 32)]
    mm = MacModel(total=4000, layers={"a": 1000, "a2": 1000, "b": 1000, "b2": 1000})
    curve = torch.linspace(1, 0, 33)
    widths = allocate(mm, sites, [curve, curve], [10.0, 1.0], 0.5, multiple=8)
    assert widths[0] > widths[1]
    assert predict_macs(mm, sites, widths) <= 2000
    # below what the sites' steps of 8 can reach, the uniform widths (single channels) take
    # over, as allocation="uniform" would; below single channels too, it is refused
    from caproj.budget import widths_for_macs

    assert allocate(mm, sites, [curve, curve], [1.0, 1.0], 0.1, multiple=8) == \
        widths_for_macs(mm, sites, 0.1, 8)
    with pytest.raises(CaprojError, match="unreachable"):
        allocate(mm, sites, [curve, curve], [1.0, 1.0], 0.01, multiple=8)


def test_cli_auto_allocation_prints_and_stores_widths(trained, tmp_path):
    out = tmp_path / "auto.pt"
    r = caproj("compress", "--weights", trained, "--data", "digits", "--target-macs", "0.5",
               "--allocate", "auto", "--cap-steps", "5", "--cap-batch-size", "64",
               "--calib-images", "200", "--finetune-epochs", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "automatic allocation: widths" in r.stdout
    ck = torch.load(out, weights_only=True)
    assert ck["metrics"]["allocation"] == "auto"
    assert abs(ck["metrics"]["macs_after"] / ck["metrics"]["macs_before"] - 0.5) <= 0.005
    r = caproj("compress", "--weights", trained, "--data", "digits", "--keep", "0.5",
               "--allocate", "auto", "--out", tmp_path / "x.pt")
    assert r.returncode == 2 and "does not combine with --keep" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_a_target_the_widths_cannot_meet_takes_the_nearest_budget_below(caplog):
    """Coarse sizes (a grouped conv's units, narrow layers): the nearest reachable cost at or
    below the goal is taken and logged, not refused; only a floor above the goal is refused."""
    from caproj.budget import solve

    cost = lambda s: 10 * s[0] + 2  # noqa: E731
    with caplog.at_level("WARNING", logger="caproj.budget"):
        sizes = solve([4], cost, 0.6 * cost([4]), units=[2], what="target_macs 0.6")
    assert sizes == [2] and cost(sizes) <= 0.6 * cost([4])
    assert "target_macs 0.6 cannot be met within 1%" in caplog.text and "0.5238" in caplog.text
    with pytest.raises(CaprojError, match="target_macs 0.3 is unreachable"):
        solve([4], cost, 0.3 * cost([4]), units=[2], what="target_macs 0.3")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, groups=8), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 10, 1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    res = __import__("caproj").compress(model, [torch.randn(8, 3, 12, 12)], target_macs=0.33,
                                        steps=0, preset=None, progress=False)
    assert res.report["target_macs"] == 0.33
    assert res.report["macs_fraction"] == pytest.approx(
        res.report["macs_after"] / res.report["macs_before"])
    assert res.report["macs_fraction"] <= 0.33


def test_refitted_damage_does_not_count_what_least_squares_recovers():
    """Channels 4-7 copy channels 0-3: keeping 0-3 loses nothing a refit of the consumer cannot
    restore exactly (W'[:, j] = W[:, j] + W[:, j + 4]), while merely masking 4-7 does lose."""
    from caproj.allocate import Damage, Refit
    from caproj.plan import Plan

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        net[0].weight[4:] = net[0].weight[:4]
        net[0].bias[4:] = net[0].bias[:4]
    sites = Plan.of(net, (3, 8, 8), keep=0.5).sites
    assert len(sites) == 1 and sites[0].consumer == "3"
    calib = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    keep = torch.arange(4)
    before = net[3].weight.clone()
    refitted = Damage(net, sites, calib, 64, Refit())(sites[0], keep)
    masked = Damage(net, sites, calib, 64, None)(sites[0], keep)
    assert refitted < 1e-6 and masked > 1e-3
    assert torch.equal(net[3].weight, before)  # the consumer's weight is put back


def test_damage_out_of_sample_counts_what_a_refit_from_few_samples_overfits(caplog):
    """A classifier-like consumer refitted from fewer pooled samples than it has inputs
    reproduces its own calibration images exactly and nothing else: in sample its damage is
    nil, measured on the images the refit did not see (`Refit.folds`) it is not. With fewer
    batches than folds the damage is measured in sample, and said so."""
    from caproj.allocate import Damage, Refit
    from caproj.plan import Plan

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    randomise_bn(net)
    sites = Plan.of(net, (3, 8, 8), keep=0.5).sites
    assert [s.consumer for s in sites] == ["5"]
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]  # 32 pooled samples, 64 inputs
    keep = torch.arange(40)
    inside = Damage(net, sites, calib, 64, Refit(ridge=1e-8))(sites[0], keep)
    outside = Damage(net, sites, calib, 64, Refit(ridge=1e-8, folds=2))(sites[0], keep)
    assert inside < 1e-4 < outside
    with caplog.at_level("INFO", logger="caproj.allocate"):
        one = Damage(net, sites, calib[:1], 64, Refit(ridge=1e-8, folds=2))(sites[0], keep)
    assert one < 1e-4 and "measured in sample" in caplog.text
    with pytest.raises(CaprojError, match="damage_folds"):
        CapConfig(damage_folds=0)
