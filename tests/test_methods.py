"""Baselines over the same sites: exact when keeping everything, right importance order on
hand-built layers, MACs on target."""

import importlib.util

import pytest
import torch
from test_cap import randomise_bn
from torch import nn

import caproj
from caproj import methods, metrics
from caproj.budget import MacModel, predict_macs, widths_for_macs
from caproj.data import load_data
from caproj.models import build_model
from caproj.sites import Site, require_sites

from conftest import loaders

HAS_TP = importlib.util.find_spec("torch_pruning") is not None


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise_bn(build_model("digits-cnn"))


@pytest.mark.parametrize("method", ["cp", "pca", "l1", "fpgm", "taylor", "cap"]
                         + (["tp-l2"] if HAS_TP else []))
def test_keeping_all_channels_is_exact(method, model, digits):
    train, calib, _ = loaders(digits, 64, 256)
    out = caproj.compress(model, train, keep=1.0, method=method, calib_data=calib,
                          steps=0 if method in ("cp", "pca") else 5,
                          progress=False).model
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert (out(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_svd_full_rank_is_exact(model, digits):
    layers = methods.svd_layers(require_sites(model), model)
    mods = dict(model.named_modules())
    x = torch.randn(2, mods[layers[0]].in_channels, 8, 8)
    conv = mods[layers[0]]
    full = methods.svd_factorise(conv, conv.out_channels)
    assert torch.allclose(full(x), conv(x), atol=1e-4)
    assert isinstance(full, nn.Sequential) and full[1].kernel_size == (1, 1)


def hand_layer():
    conv = nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 1.0], [5.0, 0.0], [0.1, 0.1], [1.1, 0.9]])
                          .view(4, 2, 1, 1))
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 3, 1))


def test_l1_and_fpgm_order_on_hand_built_layer():
    m = hand_layer()
    site = Site("0", "2", channels=4)
    assert methods.l1_scores(m, site).argsort().tolist() == [2, 0, 3, 1]  # 0.2, 2, 2.0+, 5
    # filters 0 and 3 sit near the middle of the cloud -> smallest distance sums -> pruned first
    f = methods.fpgm_scores(m, site)
    assert set(f.argsort()[:2].tolist()) == {0, 3} and f.argmax().item() == 1


def test_taylor_scores_ignore_dead_channels(digits):
    torch.manual_seed(0)
    m = build_model("digits-cnn").eval()
    with torch.no_grad():
        m.bn1.weight[5] = 0.0
        m.bn1.bias[5] = -10.0  # channel 5 is always zero after the ReLU: no effect on the loss
    sites = require_sites(m)
    s = methods.taylor_scores(m, sites, loaders(digits, 32)[0], batches=3)
    assert s[0][5].item() == 0.0 and s[0].max().item() > 0
    assert all(t.shape == (site.channels,) for t, site in zip(s, sites, strict=True))


@pytest.mark.parametrize("method", ["l1", "fpgm", "taylor", "cp"]
                         + (["tp-l2"] if HAS_TP else []))
@pytest.mark.parametrize("target", [0.5, 0.25])
def test_channel_methods_meet_macs_target(method, target, digits):
    torch.manual_seed(0)
    m = build_model("digits-cnn").eval()
    sites = require_sites(m)
    mm = MacModel.of(m, (1, 8, 8))
    widths = widths_for_macs(mm, sites, target)
    train, calib, _ = loaders(digits, 64, 256)
    res = caproj.compress(m, train, target_macs=target, method=method, calib_data=calib,
                          channel_multiple=1, progress=False,
                          steps=0 if method in ("cp", "pca") else 5)
    assert res.widths == widths
    out = res.model
    macs = metrics.count_macs(out, (1, 8, 8))
    assert macs == predict_macs(mm, sites, widths)
    assert abs(macs / mm.total - target) <= 0.01 * target


@pytest.mark.parametrize("arch, shape", [("resnet56", (3, 32, 32)), ("tv:resnet18", (3, 64, 64))])
@pytest.mark.parametrize("target", [0.5, 0.25])
def test_svd_meets_macs_target_and_adds_layers(arch, shape, target):
    m = build_model(arch).eval()
    sites = require_sites(m)
    mm = MacModel.of(m, shape)
    f = methods.factorise(m, sites, mm, target)
    assert abs(metrics.count_macs(f, shape) / mm.total - target) <= 0.01 * target
    n_conv = sum(isinstance(x, nn.Conv2d) for x in m.modules())
    assert sum(isinstance(x, nn.Conv2d) for x in f.modules()) > n_conv  # factorisation adds


def test_unknown_method(model, digits):
    from caproj.errors import CaprojError

    with pytest.raises(CaprojError, match="unknown method 'magic'"):
        caproj.compress(model, loaders(digits)[0], method="magic")


@pytest.mark.skipif(not HAS_TP, reason="torch-pruning is not installed (pip install -e '.[bench]')")
def test_magnitude_init_keeps_the_channels_torch_pruning_keeps():
    """init="magnitude" ranks channels as Torch-Pruning's GroupMagnitudeImportance(p=2) does
    (producer filters + BN weight + the consumer columns reading them): on ResNet-20 with random
    weights and BN, every narrowed site keeps exactly the channels tp-l2 keeps."""
    model = randomise_bn(build_model("resnet20")).eval()
    x = [torch.randn(32, 3, 32, 32)]
    res = caproj.compress(model, x, target_macs=0.3, method="cp", init="magnitude",
                          progress=False, seed=0)
    widths = [p.shape[1] for p in res.projections]
    tp = methods.torch_pruning_l2(model, res.sites, widths, (3, 32, 32))
    om, tm = dict(model.named_modules()), dict(tp.named_modules())
    narrowed = 0
    for s, p in zip(res.sites, res.projections, strict=True):
        if p.shape[0] == p.shape[1]:
            continue
        w = om[s.producer].weight.reshape(s.channels, -1)
        kept = torch.cdist(tm[s.producer].weight.reshape(p.shape[1], -1), w).argmin(1)
        assert kept.sort().values.tolist() == p.argmax(0).sort().values.tolist(), s.producer
        narrowed += 1
    assert narrowed >= 3


def test_a_setting_the_method_fixes_is_refused_not_dropped(model, digits):
    """cp is selection + least squares: refit=False used to be silently replaced by True. Now
    an option the user gives against a method's fixed setting is refused."""
    train, calib, _ = loaders(digits, 64, 256)
    with pytest.raises(caproj.CaprojError, match="fixes refit") as e:
        caproj.compress(model, train, keep=0.5, method="cp", refit=False, calib_data=calib,
                        progress=False)
    assert e.value.param == "refit"
    with pytest.raises(caproj.CaprojError, match="fixes init"):
        caproj.compress(model, train, keep=0.5, method="pca", init="magnitude",
                        calib_data=calib, progress=False)
    # a preset's value is not the user's: the method's fixed one wins (deep sets init)
    res = caproj.compress(model, train, keep=0.5, method="pca", preset="deep",
                          calib_data=calib, progress=False)
    assert res.report["cap_config"]["init"] == "pca"
