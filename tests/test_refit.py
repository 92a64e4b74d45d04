"""The cascaded least-squares refit in one pass (`caproj.refit`: the graph walked once, paused at
each consumer) gives the weights of the per-consumer cascade it replaced (the narrow prefix and
the original re-run for every consumer), and so does its low-memory mode."""

from __future__ import annotations

import torch
import torchvision

import caproj
from caproj import refit
from caproj.coverage import randomise_bn
from caproj.plan import Plan
from caproj.surgery import load_tensors

SHAPE = (3, 32, 32)


def per_consumer(original, narrow, calib, consumers, *, ridge, prior, solved):
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
