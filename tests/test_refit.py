"""The cascaded least-squares refit in one pass (`caproj.refit`: the graph walked once, paused at
each consumer) gives the weights of the per-consumer cascade it replaced (the narrow prefix and
the original re-run for every consumer), and so does its low-memory mode."""

from __future__ import annotations

import pytest
import torch
import torchvision

import caproj
from caproj import refit
from caproj.coverage import randomise_bn
from caproj.plan import Plan
from caproj.surgery import load_tensors

SHAPE = (3, 32, 32)


def per_consumer(original, narrow, calib, consumers, *, ridge, prior, solved, **_):
    """The reference: for each consumer in call order, both networks run from the input with
    hooks that read its narrow input and original output: O(consumers x depth) forwards."""
    order = refit.Walk(original).call_order(consumers)
    omods = dict(original.named_modules())
    for name in order:
        gram = cross = None
        for x in calib:
            got = {}
            h1 = dict(narrow.named_modules())[name].register_forward_pre_hook(
                lambda m, i, got=got: got.__setitem__("in", i[0]))
            h2 = omods[name].register_forward_hook(
                lambda m, i, o, got=got: got.__setitem__("out", o))
            with torch.no_grad():
                narrow(x)
                original(x)
            h1.remove()
            h2.remove()
            g, c = refit.normal_equations(omods[name], got["in"], got["out"])
            gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        w = refit.solve(gram, cross, omods[name].weight, ridge,
                        prior(name) if prior is not None else None)
        load_tensors(narrow, solved(name, w))
    return order


def consumer_weights(model, calib) -> dict[str, torch.Tensor]:
    plan = Plan.of(model, SHAPE, target_macs=0.6)
    cap = caproj.CaP(model, torch.zeros(1, *SHAPE), plan=plan, calib_images=48, steps=0,
                     progress=False, seed=0)
    cap.calibrate(calib)
    return {k: v.clone() for k, v in cap.consumer_w.items()}


def test_one_pass_refit_gives_the_per_consumer_cascades_weights(monkeypatch):
    torch.manual_seed(0)  # depthwise sites, residual adds, 17 blocks
    model = randomise_bn(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)).eval()
    calib = [torch.randn(16, *SHAPE) for _ in range(3)]
    one_pass = consumer_weights(model, calib)
    monkeypatch.setattr(refit, "MEMORY_SHARE", 0.0)  # low memory: prefixes re-run per consumer
    low_memory = consumer_weights(model, calib)
    monkeypatch.setattr(refit, "cascade", per_consumer)
    reference = consumer_weights(model, calib)
    assert len(one_pass) >= 10 and one_pass.keys() == reference.keys() == low_memory.keys()
    for name, w in reference.items():
        scale = w.abs().max().item()
        assert (one_pass[name] - w).abs().max().item() <= 1e-5 * scale, name
        assert (low_memory[name] - w).abs().max().item() <= 1e-5 * scale, name


def stream_errors(model, calib, shape=SHAPE, **options) -> list[float]:
    """Relative error of each residual block's output (narrow against original, the
    calibration images) after calibration with `options`."""
    plan = Plan.of(model, shape, target_macs=0.5)
    cap = caproj.CaP(model, torch.zeros(1, *shape), plan=plan, calib_images=48, steps=0,
                     progress=False, seed=0, **options)
    cap.calibrate(calib)
    small = cap.finalize()
    errs = []
    for m, n in zip(model.modules(), small.modules(), strict=True):
        if getattr(m, "use_res_connect", False):  # the block returns x + conv(x)
            outs = {}
            h1 = m.register_forward_hook(lambda mod, i, o, outs=outs: outs.__setitem__("o", o))
            h2 = n.register_forward_hook(lambda mod, i, o, outs=outs: outs.__setitem__("n", o))
            num = den = 0.0
            with torch.no_grad():
                for x in calib:
                    model(x)
                    small(x)
                    num += float((outs["n"] - outs["o"]).pow(2).sum())
                    den += float(outs["o"].pow(2).sum())
            h1.remove()
            h2.remove()
            errs.append(num / den)
    return errs


class Residual(torch.nn.Module):
    def __init__(self, c: int, hidden: int, shortcut_after: bool = False) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU(),
                                  nn.Conv2d(hidden, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))
        self.shortcut = nn.Identity() if shortcut_after else None
        self.use_res_connect = True

    def forward(self, x):
        if self.shortcut is not None:  # ResNet's order: the body, then the shortcut
            out = self.body(x)
            return out + self.shortcut(x)
        return x + self.body(x)


def test_block_targets_carry_less_error_down_the_stream():
    torch.manual_seed(0)
    nn = torch.nn
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        *[Residual(16, 48, shortcut_after=i % 2 == 1) for i in range(6)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))).eval()
    calib = [torch.randn(16, 3, 16, 16) for _ in range(3)]  # 12,288 rows for 432 unknowns
    walk = refit.Walk(model)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    closing = {c for c in convs if refit.residual_skip(walk, c) is not None}
    assert closing == {f"{i}.body.3" for i in range(3, 9)}  # conv, then BN, then the addition
    layer = stream_errors(model, calib, shape=(3, 16, 16))
    block = stream_errors(model, calib, shape=(3, 16, 16), refit_target="block")
    assert len(layer) == 6 and min(layer) > 1e-4  # the narrow blocks do lose signal
    assert block[0] == pytest.approx(layer[0], rel=1e-4)  # nothing accumulated yet: same fit
    assert all(b < 0.97 * lay for b, lay in zip(block[1:], layer[1:], strict=True))


def test_damping_pulls_an_underdetermined_refit_toward_the_projected_consumer():
    torch.manual_seed(0)
    gram_x = torch.randn(5, 12).double()  # 5 samples, 12 unknowns: many exact fits
    y = torch.randn(5, 3).double()
    gram, cross = (gram_x.T @ gram_x)[None], (gram_x.T @ y)[None]
    anchor = torch.randn(3, 12)
    free = refit.solve(gram, cross, anchor, 1e-8)
    damped = refit.solve(gram, cross, anchor, 1e-8, anchor=anchor, anchor_weight=1e3)
    assert (damped - anchor).norm() < 0.01 * (free - anchor).norm()
    assert (gram_x.float() @ free.T - y.float()).abs().max() < 1e-3  # undamped: an exact fit
