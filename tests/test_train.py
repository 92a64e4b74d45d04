"""The training engine: seeded, learns, and the frozen-BN fine-tuning mode keeps BN statistics."""

from __future__ import annotations

import pytest
import torch

from caproj.data import load_data
from caproj.models import build_model
from caproj.train import TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _fit(digits, **kw):
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, in_channels=1)
    cfg = TrainConfig(epochs=6, lr=0.05, batch_size=64, seed=3, **kw)
    hist = train(model, digits, cfg, log=lambda s: None)
    return model, hist


def test_training_learns_and_is_reproducible(digits):
    a, ha = _fit(digits, bf16=False)
    b, hb = _fit(digits, bf16=False)
    assert ha[-1]["test_acc"] > 50  # 10 classes: chance is 10 %
    assert ha[-1]["test_acc"] == hb[-1]["test_acc"]
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_freeze_bn_keeps_running_statistics_but_learns_affine(digits):
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, in_channels=1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns, "digits-cnn is expected to have BatchNorm"
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone())
              for m in bns]
    train(model, digits, TrainConfig(epochs=6, lr=0.05, batch_size=64,
                                     freeze_bn=True, bf16=False), log=lambda s: None)
    for m, (mean, var, w) in zip(bns, before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert not torch.equal(m.weight.detach(), w)
    assert evaluate(model, digits)["acc"] > 25  # still learns (chance: 10 %)
