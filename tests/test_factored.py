"""Factored fine-tuning: the network starts as exactly the original, narrows while it trains
and merges exactly into the narrow network (caproj.factored); `resrep` and `--factored` run
it through compress."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import caproj
from caproj import metrics
from caproj.coverage import randomise_bn
from caproj.factored import Factored, placement
from caproj.models import build_model
from caproj.plan import Plan


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=True), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 10))).eval()


def _orthonormal(c: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(c, k, generator=g))[0]


def _train(f: nn.Module, steps: int, shape=(3, 16, 16)) -> None:
    opt = torch.optim.SGD(f.parameters(), lr=0.05, momentum=0.9)
    f.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, *shape, generator=g)
        loss = F.cross_entropy(f(x), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    f.eval()


def test_starts_as_the_original_and_merges_exactly_after_training():
    model = _net()
    plan = Plan.of(model, (3, 16, 16))
    ps = [_orthonormal(s.channels, s.channels // 2, i) for i, s in enumerate(plan.sites)]
    f = Factored(model, plan.sites, ps, ramp_steps=4)
    x = torch.randn(6, 3, 16, 16)
    assert (f.eval()(x) - model(x)).abs().max() <= 1e-5  # the identity start: the original
    with pytest.raises(caproj.CaprojError) as e:
        f.merge()  # still blending
    assert e.value.param == "factored_ramp"
    _train(f, 7)  # every weight, compactor and BN statistic moved
    assert f.done and int(f.step) == 7
    # only the end network trained: the original consumer is the gradient-free remainder
    assert f.net[3].parametrizations.weight.original.grad is None
    assert f.net[3].parametrizations.weight[0].target.grad is not None
    assert f.compactors[0].b.grad is not None
    small = f.merge()
    assert [m.out_channels for m in small if isinstance(m, nn.Conv2d)] == [4, 6]
    assert small[8].in_features == 24  # the Linear after flatten reads 6 x 2 x 2
    ref = f(x)
    assert (small(x) - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    # the merge leaves the factored network usable, and a deep copy (EMA) computes the same
    assert torch.equal(f(x), ref)
    assert torch.equal(copy.deepcopy(f)(x), ref)


def test_resnet_merge_is_exact_with_cap_projections_and_skips_whole_sites():
    torch.manual_seed(0)
    model = randomise_bn(build_model("resnet20")).eval()
    plan = Plan.of(model, (3, 32, 32))
    ps = [_orthonormal(s.channels, s.channels if i == 0 else s.channels // 4, i)
          for i, s in enumerate(plan.sites)]
    f = Factored(model, plan.sites, ps, ramp_steps=2)
    assert len(f.compactors) == len(plan.sites) - 1  # a site kept whole gets no compactors
    _train(f, 2, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    small = f.merge()
    assert (small(x) - f(x)).abs().max() <= 1e-4
    assert metrics.count_macs(small, (3, 32, 32)) < \
        metrics.count_macs(model, (3, 32, 32))


def test_placement_keeps_a_selection_in_place_and_is_a_matching():
    p = torch.eye(6)[:, [4, 1, 3]]
    assert placement(p) == [4, 1, 3]
    rows = placement(_orthonormal(16, 7, 0))
    assert len(set(rows)) == 7 and all(0 <= r < 16 for r in rows)


def test_compactors_are_not_weight_decayed():
    from caproj.train import make_optimizer
    model = _net()
    plan = Plan.of(model, (3, 16, 16))
    f = Factored(model, plan.sites, [_orthonormal(s.channels, 2, 0) for s in plan.sites], 3)
    opt = make_optimizer(f, caproj.TrainConfig())
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(p) not in decayed for p in f.compactors.parameters())
    assert id(f.net[0].weight) in decayed


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=16)


@pytest.mark.parametrize("method", ["cp", "cap", "resrep"])
def test_compress_with_factored_fine_tuning_returns_the_merged_network(method, caplog):
    caplog.set_level(logging.INFO, logger="caproj")
    model, data = _net(), _data()
    ft = {"epochs": 2, "lr": 0.01} | ({} if method == "resrep" else {"factored": True})
    res = caproj.compress(model, data, target_macs=0.5, method=method, preset=None,
                          steps=0 if method in ("cp", "pca") else 3,
                          calib_images=32, finetune=ft, eval_data=_data(32, 1), progress=False)
    assert res.report["finetune_config"]["factored"] is True
    assert res.report["macs_after"] <= 0.5 * res.report["macs_before"] * 1.02
    assert metrics.count_macs(res.model, (3, 16, 16)) == res.report["macs_after"]
    # the last evaluation was of the factored network; the merged one scores the same
    assert caproj.evaluate(res.model, _data(32, 1), progress=False)["acc"] == \
        res.report["acc_after_finetune"]
    assert res.projections is not None and len(res.projections) == len(res.sites)
    # 2 epochs of 4 batches: the default narrows over a tenth of them (the measured best);
    # resrep over half (ResRep's long schedule)
    assert res.report["finetune_config"]["factored_ramp"] == (0.5 if method == "resrep" else 0.1)
    assert f"narrowing over {4 if method == 'resrep' else 1} of 8 steps" in caplog.text


def test_factored_refuses_what_it_cannot_narrow():
    model, data = _net(), _data()
    with pytest.raises(caproj.CaprojError) as e:  # Torch-Pruning has no projection
        caproj.compress(model, data, target_macs=0.5, method="tp-l2", preset=None,
                        finetune={"epochs": 1, "factored": True}, progress=False)
    assert e.value.param == "factored"
    with pytest.raises(caproj.CaprojError) as e:  # a narrow network alone is not enough
        caproj.finetune(model, data, epochs=1, factored=True, progress=False)
    assert e.value.param == "factored"
    with pytest.raises(caproj.CaprojError) as e:
        caproj.TrainConfig(factored=True, factored_ramp=0)
    assert e.value.param == "factored_ramp"
    resnet = build_model("resnet20")
    plan = Plan.of(resnet, (3, 32, 32), stream_projection=True)
    tied = [s for s in plan.sites if s.tied]
    with pytest.raises(caproj.CaprojError) as e:
        Factored(resnet, tied, [torch.eye(s.channels)[:, :4] for s in tied], 5)
    assert e.value.param == "factored"
