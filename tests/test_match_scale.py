"""match_weight_scale / compress(match_scale=True): layers that feed a BN get the original
layer's weight size back, and the network computes exactly what it did."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import caproj
from caproj.coverage import randomise_bn
from caproj.models import build_model
from caproj.sites import conv_bn_pairs


def _rms(w: torch.Tensor) -> float:
    return float(w.detach().pow(2).mean().sqrt())


class ConvBN(nn.Module):
    def __init__(self, affine: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8, affine=affine)
        self.b = nn.Conv2d(8, 8, 3, padding=1)  # read by a ReLU, not a BN: not a pair
        self.fc = nn.Linear(8, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.bn(self.a(x)))))
        return self.bn1d(self.fc(x.mean((2, 3))))


def test_pairs_are_the_layers_only_a_bn_reads():
    assert conv_bn_pairs(ConvBN()) == [("a", "bn"), ("fc", "bn1d")]


@pytest.mark.parametrize("affine,bias", [(True, False), (False, True)])
def test_rescaling_restores_the_size_and_keeps_the_eval_function(affine, bias):
    torch.manual_seed(0)
    original = randomise_bn(ConvBN(affine, bias)).eval()
    model = randomise_bn(ConvBN(affine, bias), seed=1).eval()
    with torch.no_grad():
        model.a.weight.mul_(0.2)  # like a CaP producer: a fraction of the original size
        model.fc.weight.mul_(5.0)  # like a refitted consumer
    x = torch.randn(16, 3, 6, 6)
    before = model(x)
    rms_b = _rms(model.b.weight)
    expect = {n: _rms(getattr(model, n).weight) / _rms(getattr(original, n).weight)
              for n in ("a", "fc")}
    ratios = caproj.match_weight_scale(model, original)  # the staged-API spelling
    assert ratios == pytest.approx(expect, rel=1e-5)
    for name in ("a", "fc"):
        assert _rms(getattr(model, name).weight) == pytest.approx(
            _rms(getattr(original, name).weight), rel=1e-5)
    assert _rms(model.b.weight) == rms_b  # not behind a BN: untouched
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    # a second call finds every size right and changes nothing
    assert caproj.match_weight_scale(model, original) == {}


def _cifar_batches(n=256, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return DataLoader(x, batch_size=batch)


def test_compress_match_scale_changes_sizes_not_outputs():
    """CaP's folded producers come out far from the original size; with match_scale every
    layer that feeds a BN is back at it, and the compressed network's outputs are the same."""
    model = randomise_bn(build_model("resnet20")).eval()
    data = _cifar_batches()
    kw = dict(target_macs=0.5, steps=0, calib_images=128, progress=False, seed=0)
    plain = caproj.compress(model, data, match_scale=False, **kw)  # (the label-free preset
    scaled = caproj.compress(model, data, match_scale=True, **kw)  # would rescale)
    ratios = scaled.report["match_scale"]
    assert ratios and "match_scale" not in plain.report
    assert max(abs(r - 1) for r in ratios.values()) > 0.1  # there was something to fix
    om, sm = dict(model.named_modules()), dict(scaled.model.named_modules())
    for name in ratios:
        assert _rms(sm[name].weight) == pytest.approx(_rms(om[name].weight), rel=1e-4)
    x = next(iter(_cifar_batches(32, 32, seed=1)))
    with torch.no_grad():
        torch.testing.assert_close(scaled.model(x), plain.model(x), rtol=1e-3, atol=1e-4)
    assert scaled.report["cap_config_requested"]["match_scale"] is True


def test_frozen_bn_fine_tuning_skips_match_scale_and_a_given_max_steps_caps_the_budget(trained):
    """Behind a frozen BN a layer shrunk by r steps r^2 further relative to its weights: the
    digits CNN, rescaled and fine-tuned with BN frozen, fell from 96 to 12 % (and two torchrun
    processes drifted apart through that fall). compress skips match_scale when its
    fine-tuning freezes BN, and says so; pruning's form too (the `learn` preset's, whose BN
    statistics are re-estimated on the narrowed inputs: it fell from 96.7 to 11 % so). A
    max_steps the user gives stays a cap on the fine-tuning a preset plans from the budget (it
    used to be replaced)."""
    from caproj.data import load_data

    from conftest import loaders

    train, calib, test = loaders(load_data("digits"), 64)
    kw = dict(target_macs=0.5, preset="learn", calib_data=calib, eval_data=test, progress=False,
              seed=0)
    frozen = caproj.compress(caproj.load(trained), train,
                             finetune={"epochs": 1, "freeze_bn": True, "max_steps": 20}, **kw)
    rep = frozen.report
    assert rep["match_scale_skipped"] == "freeze_bn" and "match_scale" not in rep
    assert rep["pruned_form_skipped"] == "freeze_bn" and "pruned_form" not in rep
    assert rep["finetune_config"]["max_steps"] == 20
    assert rep["acc_after_finetune"] > rep["acc_after_compress"] - 5  # no fall
    free = caproj.compress(caproj.load(trained), train,
                           finetune={"epochs": 1, "max_steps": 20}, **kw)
    assert free.report["match_scale"] and "match_scale_skipped" not in free.report
    assert free.report["pruned_form"] and "pruned_form_skipped" not in free.report


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                    reason="torch-pruning is not installed (pip install -e '.[bench]')")
def test_pruned_form_without_refit_is_torch_pruning_network():
    """pruned_form: a selection's kept channels get their original filters and BNs back, so
    Torch-Pruning's ranking without a refit is Torch-Pruning's network: the same parameters,
    and in training mode (batch statistics) the same outputs. Its BN statistics are
    re-estimated on the calibration images, where Torch-Pruning keeps the stale ones."""
    import copy

    from caproj.methods import torch_pruning_l2

    model = randomise_bn(build_model("resnet20")).eval()
    data = _cifar_batches()
    res = caproj.compress(model, data, target_macs=0.4, method="cap", steps=0,
                          init="magnitude", refit=False, pruned_form=True, calib_images=128,
                          preset=None, match_scale=False, progress=False, seed=0)
    assert res.report["pruned_form"]
    tp = torch_pruning_l2(model, res.sites, res.widths, (3, 32, 32))
    ours = dict(res.model.named_parameters())
    for name, t in tp.named_parameters():
        torch.testing.assert_close(ours[name], t, rtol=1e-5, atol=1e-6, msg=name)
    x = next(iter(_cifar_batches(32, 32, seed=1)))
    a, b = copy.deepcopy(res.model).train(), copy.deepcopy(tp).train()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)



def test_pruned_form_unfolds_a_producer_that_is_also_a_refitted_consumer():
    """In a plain CNN a layer is a site's producer and the previous site's consumer: its rows
    keep the input side the refit gave them, only the BN fold is undone (row x gamma / sigma
    is the function-preserving row), and its BN is the original's for the kept channels."""
    model = randomise_bn(build_model("digits-cnn")).eval()
    calib = [torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    kw = dict(keep=0.5, method="cp", preset=None, match_scale=False, progress=False, seed=0)
    plain = caproj.compress(model, calib, **kw)
    pf = caproj.compress(model, calib, pruned_form=True, **kw)
    om, a, b = (dict(m.named_modules()) for m in (model, plain.model, pf.model))
    assert len(pf.report["pruned_form"]) == len(pf.sites) >= 2
    for s, p in zip(pf.sites, pf.projections, strict=True):
        keep = p.argmax(0)
        bn = om[s.bn]
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps))[keep]
        torch.testing.assert_close(b[s.producer].weight * scale.reshape(-1, 1, 1, 1),
                                   a[s.producer].weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b[s.bn].weight, bn.weight[keep])
        torch.testing.assert_close(b[s.bn].bias, bn.bias[keep])
