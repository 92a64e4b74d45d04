"""Sites: the one abstraction every method works on.

A site is `producer -> [BatchNorm] -> channel-wise ops -> consumer`, found in the torch.fx graph:
the producer (Conv2d with groups=1, or Linear) makes `c` channels, nothing but channel-wise ops
(activations, pooling, dropout, flatten) touch them, and exactly one consumer (Conv2d with
groups=1, or Linear) reads them. Its middle channels can then be shrunk to c' < c by changing
only the producer's output side and the consumer's input side: a projection P (c x c') for
CaP, a column selection for pruning. Tensors that feed a residual addition, a concatenation or a
second reader are not sites; `find_sites` says, for every producer, why it is not one.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from caproj.errors import CaprojError

CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity,
)
CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
}
CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
PRODUCERS = (nn.Conv2d, nn.Linear)


@dataclass
class Site:
    """producer -> [bn] -> channel-wise ops -> consumer, all named as in model.named_modules()."""

    producer: str
    consumer: str
    channels: int
    bn: str | None = None
    spatial: int = 1  # Linear consumer after flatten: input features = channels * spatial
    ops: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mid = " -> ".join(([self.bn] if self.bn else []) + self.ops)
        mid = mid + " -> " if mid else ""
        return f"{self.producer} -> {mid}{self.consumer} ({self.channels} ch)"


@dataclass
class SiteReport:
    sites: list[Site]
    skipped: dict[str, str]  # producer name -> why it is not a site


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = type(model).__name__
        raise CaprojError(f"cannot trace {name} with torch.fx: {msg[:200]}") from None


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _is_channelwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.PReLU) and m.num_parameters != 1:
            return False  # per-channel slopes would have to be projected too
        return isinstance(m, CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in CHANNELWISE_METHODS
    return False


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.Flatten)
    if node.op == "call_function":
        return node.target in FLATTEN_FUNCTIONS
    return node.op == "call_method" and node.target in FLATTEN_METHODS


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features  # type: ignore[return-value]


def find_sites(model: nn.Module) -> SiteReport:
    """All sites of `model` in execution order, plus the reason each other producer is not one."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], PRODUCERS):
            continue
        name = str(node.target)
        prod = modules[name]
        if isinstance(prod, nn.Conv2d) and prod.groups != 1:
            skipped[name] = f"grouped/depthwise conv (groups={prod.groups})"
            continue
        if calls[name] != 1:
            skipped[name] = "module is called more than once"
            continue
        c = _out_channels(prod)
        bn, ops, cur, flat = None, [], node, False
        reason = None
        while True:
            users = list(cur.users)
            if len(users) != 1:
                reason = (f"output of {_describe(cur, modules)} has {len(users)} readers"
                          + (" (a residual or concatenation)" if len(users) > 1 else ""))
                break
            nxt = users[0]
            if nxt.args[:1] != (cur,):
                reason = f"feeds {_describe(nxt, modules)} as a non-first argument"
                break
            m = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
            if m is not None and isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and bn is None \
                    and not ops and calls[str(nxt.target)] == 1 and m.num_features == c:
                bn, cur = str(nxt.target), nxt
                continue
            if m is not None and isinstance(m, PRODUCERS) and calls[str(nxt.target)] == 1:
                if isinstance(m, nn.Conv2d) and (m.groups != 1 or flat):
                    reason = f"consumer {nxt.target} is a grouped conv or follows a flatten"
                    break
                in_feat = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                if in_feat % c:
                    reason = f"consumer {nxt.target} reads {in_feat} features from {c} channels"
                    break
                if isinstance(m, nn.Linear) and isinstance(prod, nn.Conv2d) and not flat \
                        and in_feat != c:
                    reason = f"consumer {nxt.target} is a Linear on an unflattened feature map"
                    break
                sites.append(Site(name, str(nxt.target), c, bn, in_feat // c, ops))
                break
            if _is_channelwise(nxt, modules):
                ops.append(_describe(nxt, modules))
                cur = nxt
                continue
            if _is_flatten(nxt, modules) and not flat:
                flat = True
                ops.append(_describe(nxt, modules))
                cur = nxt
                continue
            if nxt.op == "call_function" and nxt.target in (operator.add, torch.add, torch.cat):
                reason = f"feeds {_describe(nxt, modules)} (a residual addition or concatenation)"
            elif nxt.op == "output":
                reason = "is the model output"
            else:
                reason = f"feeds {_describe(nxt, modules)}, which is not channel-wise"
            break
        if reason is not None:
            skipped[name] = reason
    return SiteReport(sites, skipped)


def require_sites(model: nn.Module) -> list[Site]:
    """find_sites, or a one-line error naming the first layer and the pattern that stops it."""
    rep = find_sites(model)
    if not rep.sites:
        if not rep.skipped:
            raise CaprojError(f"{type(model).__name__} has no Conv2d/Linear layer to compress")
        first, why = next(iter(rep.skipped.items()))
        raise CaprojError(f"no compressible site in {type(model).__name__}: e.g. {first} {why}")
    return rep.sites
