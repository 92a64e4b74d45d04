"""Inference-time forms of a model, for latency measured the way it would be deployed.

Thin layers are overhead-bound at batch 1: in eager PyTorch every conv, BN, ReLU and add is a
separate dispatch. `fold_bn` removes the BatchNorms (torch.fx conv-bn fusion); `freeze`
additionally traces and freezes the graph with TorchScript so that conv+add+ReLU run as fused
oneDNN ops without Python in between. The same transform is applied to original and compressed
models before they are compared (see benchmarks/latency.py for what each form gives).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from caproj.errors import CaprojError

FORMS = ("eager", "fold_bn", "freeze")


def fold_bn(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def freeze(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    m = fold_bn(model)
    x = torch.zeros(1, *input_shape, device=next(m.parameters()).device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, x)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def for_inference(model: nn.Module, form: str, input_shape: tuple[int, ...]) -> nn.Module:
    if form == "eager":
        return model.eval()
    if form == "fold_bn":
        return fold_bn(model)
    if form == "freeze":
        return freeze(model, input_shape)
    raise CaprojError(f"unknown inference form {form!r}; choose one of {', '.join(FORMS)}")
