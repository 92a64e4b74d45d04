"""Sites: the one abstraction every method works on.

A site is `producer -> [BatchNorm] -> channel-wise ops -> consumer`, found in the torch.fx graph:
the producer (Conv2d or Linear) makes `c` channels, nothing but channel-wise ops (activations,
pooling, dropout, flatten) touch them, and exactly one consumer (Conv2d or Linear) reads them.
Its middle channels can then be shrunk to c' < c by changing only the producer's output side and
the consumer's input side: a projection P (c x c') for CaP, a column selection for pruning.
Tensors that feed a residual addition, a concatenation or a second reader are not sites;
`find_sites` says, for every producer, why it is not one.

Depthwise and grouped convolutions (MobileNet, MNASNet, ResNeXt, RegNet):
- a depthwise conv (groups = in = out channels) or a BatchNorm *between* producer and consumer
  acts on each channel alone. It commutes with channel *selection* but not with a dense mixing,
  so it joins the site as a `mid` and the site's P is constrained to a selection
  (`Site.selection`): the expansion channels of an inverted residual
  (1x1 -> BN -> act -> depthwise -> BN -> act -> 1x1) form one site whose consumer is refitted
  densely on the selected channels;
- a grouped producer or consumer (groups = G) keeps G equal groups: P is block-diagonal with G
  orthonormal blocks (`Site.groups`), so widths are multiples of G.

Stream sites (`find_sites(model, stream=True)`, beyond the paper): every tensor tied to a
residual addition shares its channels with the addition's other inputs, the tensors derived
from it channel-wise (the ReLU after the add, pooling) and so on. Such a tied group — a ResNet
stage's stream: the stem or transition convs' outputs, each block's last conv, identity and 1x1
projection shortcuts, option-A zero-pad shortcuts, the next blocks' first convs and the
classifier — is one site with several producers and consumers sharing one P, found by walking
the graph from each addition (the dependency-group idea of Torch-Pruning). A fixed channel map
between two groups (option-A padding, `PadShortcut.channel_map`) becomes P_out^T E P_in. A
group whose channels reach anything else (a concatenation, a pre-activation BN, the model
output, a multiplication) is not a site, and the reason is reported.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from caproj.errors import CaprojError

log = logging.getLogger(__name__)

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
    """producer -> [bn] -> channel-wise ops -> consumer, all named as in model.named_modules().

    A stream site (tied group) has more producers and consumers sharing the same P, and the
    fixed channel maps (PadShortcut) that write into it or read from it."""

    producer: str
    consumer: str
    channels: int
    bn: str | None = None
    spatial: int = 1  # Linear consumer after flatten: input features = channels * spatial
    ops: list[str] = field(default_factory=list)
    more_producers: list[tuple[str, str | None]] = field(default_factory=list)  # (conv, bn)
    more_consumers: list[tuple[str, int]] = field(default_factory=list)  # (layer, spatial)
    maps_in: list[str] = field(default_factory=list)  # channel maps writing into the group
    maps_out: list[str] = field(default_factory=list)  # channel maps reading the group
    mids: list[str] = field(default_factory=list)  # depthwise convs / BNs inside: selection only
    groups: int = 1  # grouped producer/consumer: P block-diagonal, G equal blocks
    # squeeze-excitation gates on the channels: (reader, writer) = the conv/linear reading the
    # pooled channels (its input columns are selected) and the one writing the per-channel
    # scales (its rows are selected)
    gates: list[tuple[str, str]] = field(default_factory=list)

    @property
    def selection(self) -> bool:
        """P must be a channel selection (a depthwise conv, BN or SE gate sits between)."""
        return bool(self.mids or self.gates)

    @property
    def producers(self) -> list[tuple[str, str | None]]:
        return [(self.producer, self.bn)] + self.more_producers

    @property
    def consumers(self) -> list[tuple[str, int]]:
        return [(self.consumer, self.spatial)] + self.more_consumers

    @property
    def tied(self) -> bool:
        return bool(self.more_producers or self.more_consumers or self.maps_in or self.maps_out)

    def __str__(self) -> str:
        if self.tied:
            return (f"stream {self.producer} +{len(self.more_producers)} producers -> "
                    f"{self.consumer} +{len(self.more_consumers)} consumers "
                    f"({self.channels} ch)")
        mid = " -> ".join(([self.bn] if self.bn else []) + self.ops)
        mid = mid + " -> " if mid else ""
        extra = (", selection" if self.selection else "") + \
            (f", {self.groups} groups" if self.groups > 1 else "")
        return f"{self.producer} -> {mid}{self.consumer} ({self.channels} ch{extra})"


@dataclass
class SiteReport:
    sites: list[Site]
    skipped: dict[str, str]  # producer name -> why it is not a site


class _Tracer(fx.Tracer):
    """Keeps modules with a fixed `channel_map` (option-A shortcuts) and every BatchNorm
    subclass (timm's BatchNormAct2d: BN + activation in one module) as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "channel_map") or isinstance(m, nn.modules.batchnorm._BatchNorm) \
            or super().is_leaf_module(m, qualname)


def _fused_act(m: nn.Module) -> nn.Module | None:
    """The activation a BN subclass applies after normalising (timm's BatchNormAct2d), if any
    that is not the identity."""
    act = getattr(m, "act", None)
    drop = getattr(m, "drop", None)
    extra = [a for a in (act, drop) if isinstance(a, nn.Module) and not isinstance(
        a, (nn.Identity, nn.Dropout, nn.Dropout2d))]
    return extra[0] if extra else None


def _bn_ok(m: nn.Module) -> bool:
    """A BN a site may fold: plain, or followed inside the module by a channel-wise activation
    (per-channel parameters such as PReLU(c) would have to be projected too)."""
    act = _fused_act(m)
    if act is None:
        return True
    if isinstance(act, nn.PReLU) and act.num_parameters != 1:
        return False
    return isinstance(act, CHANNELWISE_MODULES)


class _ExampleTracer(_Tracer):
    """Traces while running the example input alongside, so that Python control flow on
    tensors (`if x.shape[1] != self.channels: raise`, as in Hugging Face models) takes the
    branch the example takes instead of failing. The graph is specialised to that branch:
    right for every input that takes it, as a CNN's fixed-shape inputs do."""

    def __init__(self, example: tuple) -> None:
        super().__init__()
        self.example, self.eager = list(example), False

    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs) if self.eager else \
            super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.eager else \
            super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        a, k = fx.node.map_aggregate((args, kwargs), lambda v: v.node.meta.get("value")
                                     if isinstance(v, fx.Proxy) else v)
        self.eager = True  # modules and parameters are called and read as plain Python
        try:
            proxy.node.meta["value"] = self._run(kind, target, a, k)
        finally:
            self.eager = False
        return proxy

    def _run(self, kind: str, target, args, kwargs):
        if kind == "placeholder":
            return self.example.pop(0) if self.example else None
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "get_attr":
            return operator.attrgetter(target)(self.root)
        return None

    def to_bool(self, obj: fx.Proxy) -> bool:
        if not _static(obj.node):  # a branch on tensor values would hold for this batch only
            what = getattr(obj.node.target, "__name__", str(obj.node.target))
            raise fx.proxy.TraceError(f"the forward branches on tensor values (`{what}` of "
                                      f"{obj.node.name}), not only on their shapes")
        return bool(obj.node.meta.get("value"))

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(len(obj.node.meta.get("value")))])

    def keys(self, obj: fx.Proxy):
        return obj.node.meta.get("value").keys()


SHAPE_ATTRS = ("shape", "ndim", "dtype", "device", "is_cuda")


def _static(node: fx.Node, seen: dict[fx.Node, bool] | None = None) -> bool:
    """Whether a traced value depends on its inputs' shapes alone, not on tensor values: the
    same for every batch of that shape."""
    seen = {} if seen is None else seen
    if node not in seen:
        if node.op in ("placeholder", "get_attr", "call_module"):
            seen[node] = False
        elif node.op == "call_function" and node.target is getattr and \
                len(node.args) > 1 and node.args[1] in SHAPE_ATTRS:
            seen[node] = True
        elif node.op == "call_method" and node.target in ("size", "dim"):
            seen[node] = True
        else:
            seen[node] = all(_static(a, seen) for a in node.all_input_nodes)
    return seen[node]


_EXAMPLE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("example", default=None)


@contextlib.contextmanager
def traced_on(*example: torch.Tensor):
    """Within it, a model whose forward branches on its input is traced on `example`
    (one batch of inputs) instead of being refused. An example already in force (the
    caller's batch) is kept."""
    token = _EXAMPLE.set(_EXAMPLE.get() or example)
    try:
        yield
    finally:
        _EXAMPLE.reset(token)


class _Call(nn.Module):
    """`model(x)` as a module: tracing enters the model's forward through a plain call, so
    its other parameters take their defaults (`labels=None`) and decorators that read
    `**kwargs` (Hugging Face's `can_return_tuple`) see them as a user's call does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x)


def _trace_on(model: nn.Module, example: tuple) -> fx.GraphModule:
    with torch.no_grad():
        graph = _ExampleTracer(example).trace(_Call(model))
    for n in graph.nodes:
        n.meta.pop("value", None)  # the example's activations are not kept
        if n.op in ("call_module", "get_attr"):
            n.target = str(n.target).removeprefix("model.")  # names as in `model`
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.graph.eliminate_dead_code()  # the checks that read shapes, now decided
    gm.recompile()
    return gm


def trace(model: nn.Module) -> fx.GraphModule:
    name, example = type(model).__name__, _EXAMPLE.get()
    try:
        try:
            return fx.GraphModule(model, _Tracer().trace(model), name)
        except fx.proxy.TraceError:
            if example is None:
                raise
            gm = _trace_on(model, example)
            log.info("%s branches on its input: traced on the example batch, so its graph "
                     "takes the branches that input takes", name)
            return gm
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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


def is_depthwise(m: nn.Module) -> bool:
    """A conv acting on each channel alone (groups = in = out channels)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and \
        m.groups == m.in_channels == m.out_channels


MUL_FUNCTIONS = {operator.mul, torch.mul}


def _gate(x: fx.Node, users: list[fx.Node], modules: dict[str, nn.Module],
          calls: dict[str, int], c: int) -> tuple[fx.Node, str, str] | None:
    """Squeeze-excitation on `x`: x * act(writer(act(reader(pool(x))))), with `x`'s two readers
    the multiplication and the pooling. Returns (multiplication, reader, writer)."""
    muls = [u for u in users if u.op == "call_function" and u.target in MUL_FUNCTIONS
            and len(u.args) == 2 and x in u.args]
    if len(muls) != 1:
        return None
    mul = muls[0]
    other = mul.args[1] if mul.args[0] is x else mul.args[0]
    side = [u for u in users if u is not mul]
    if len(side) != 1:
        return None
    cur, layers = side[0], []
    for _ in range(12):
        m = modules.get(str(cur.target)) if cur.op == "call_module" else None
        if m is not None and isinstance(m, PRODUCERS):
            if calls[str(cur.target)] != 1 or (isinstance(m, nn.Conv2d) and m.groups != 1):
                return None
            layers.append((str(cur.target), m))
        elif not (_is_channelwise(cur, modules) or cur.op == "call_method"
                  and cur.target == "mean"):
            return None
        if cur is other:
            break
        if len(cur.users) != 1:
            return None
        cur = next(iter(cur.users))
    else:
        return None
    if len(layers) != 2:
        return None
    (rname, reader), (wname, writer) = layers
    r_in = reader.in_channels if isinstance(reader, nn.Conv2d) else reader.in_features
    w_out = _out_channels(writer)
    return (mul, rname, wname) if r_in == c and w_out == c else None


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features  # type: ignore[return-value]


ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in ADD_FUNCTIONS and len(n.args) >= 2
            and all(isinstance(a, fx.Node) for a in n.args[:2]))


def _stream_sites(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int]
                  ) -> tuple[list[tuple[int, Site]], dict[str, str]]:
    """Tied groups around residual additions: ((graph position, Site)) for each group that can
    share one projection, and {first producer: why not} for those that cannot."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    grouped: set[fx.Node] = set()
    sites: list[tuple[int, Site]] = []
    refused: dict[str, str] = {}
    starts = [n for n in gm.graph.nodes if _is_add(n)]
    while starts:
        start = starts.pop(0)
        if start in grouped:
            continue
        stream = _Stream(start, modules, calls, starts)
        grouped |= stream.members
        found = stream.site(order)
        if isinstance(found, str):
            first = stream.producers[0][1] if stream.producers else str(start.target)
            refused[first] = found
        else:
            sites.append((order[stream.producers[0][0]], found))
    return sites, refused


class _Stream:
    """The tied group around one residual addition: every tensor added to it, the layers that
    write it (with their BNs), those that read it and the channel maps on its edges, gathered
    by walking the graph both ways. `problem` says why it cannot share one projection."""

    def __init__(self, start: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                 starts: list[fx.Node]) -> None:
        self.modules, self.calls, self.starts = modules, calls, starts
        self.members, self.queue = {start}, [start]
        self.producers: list[tuple[fx.Node, str, str | None]] = []
        self.consumers: list[tuple[fx.Node, str]] = []
        self.maps_in: list[str] = []
        self.maps_out: list[str] = []
        self.problem: str | None = None
        while self.queue and self.problem is None:
            n = self.queue.pop()
            self.source(n)
            self.readers(n)

    def mod(self, n: fx.Node) -> nn.Module | None:
        return self.modules.get(str(n.target)) if n.op == "call_module" else None

    def visit(self, n: fx.Node) -> None:
        if n not in self.members:
            self.members.add(n)
            self.queue.append(n)

    def source(self, n: fx.Node) -> None:
        """Where the tensor `n` comes from."""
        m = self.mod(n)
        if _is_add(n):
            for a in n.args[:2]:
                self.visit(a)  # type: ignore[arg-type]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            src = n.args[0]
            sm = self.mod(src) if isinstance(src, fx.Node) else None
            if not isinstance(sm, PRODUCERS) or len(src.users) != 1 or \
                    self.calls[str(src.target)] != 1 or self.calls[str(n.target)] != 1:
                self.problem = f"{n.target} normalises the stream itself (pre-activation)"
            elif _fused_act(m) is not None:
                self.problem = f"{n.target} applies an activation inside its BatchNorm"
            else:
                self.producers.append((src, str(src.target), str(n.target)))
        elif isinstance(m, PRODUCERS):
            if isinstance(m, nn.Conv2d) and m.groups != 1 or self.calls[str(n.target)] != 1:
                self.problem = f"{n.target} (grouped or reused) writes the stream"
            else:
                self.producers.append((n, str(n.target), None))
        elif m is not None and hasattr(m, "channel_map"):
            self.maps_in.append(str(n.target))
            self.starts.append(n)  # its input is another group's tensor: seeds nothing here
        elif _is_channelwise(n, self.modules) or _is_flatten(n, self.modules):
            self.visit(n.args[0])  # type: ignore[arg-type]
        else:
            self.problem = f"the stream starts at {_describe(n, self.modules)}"

    def readers(self, n: fx.Node) -> None:
        """Where the tensor `n` goes."""
        for u in n.users:
            um = self.mod(u)
            if u in self.members:
                continue
            if _is_add(u) or _is_channelwise(u, self.modules) or _is_flatten(u, self.modules):
                self.visit(u)
            elif isinstance(um, PRODUCERS):
                if isinstance(um, nn.Conv2d) and um.groups != 1 or \
                        self.calls[str(u.target)] != 1:
                    self.problem = f"stream read by {u.target} (grouped or reused)"
                else:
                    self.consumers.append((u, str(u.target)))
            elif um is not None and hasattr(um, "channel_map"):
                self.maps_out.append(str(u.target))
            else:
                self.problem = f"stream feeds {_describe(u, self.modules)}"

    def site(self, order: dict[fx.Node, int]) -> Site | str:
        """The tied Site (producers and consumers in graph order), or why there is none."""
        self.producers.sort(key=lambda t: order[t[0]])
        self.consumers.sort(key=lambda t: order[t[0]])
        if self.problem is not None:
            return self.problem
        if not self.producers or not self.consumers:
            return "no producer or no consumer"
        widths = {_out_channels(self.modules[p]) for _, p, _ in self.producers}
        if len(widths) != 1:
            return f"producers of different widths {sorted(widths)}"
        c = widths.pop()
        spat = []
        problem = None
        for _, name in self.consumers:
            cm = self.modules[name]
            f = cm.in_channels if isinstance(cm, nn.Conv2d) else cm.in_features
            if f % c or (isinstance(cm, nn.Conv2d) and f != c):
                problem = f"{name} reads {f} features from {c} channels"
            spat.append(f // c)
        if problem is not None:
            return problem
        (_, p0, b0), rest = self.producers[0], self.producers[1:]
        return Site(p0, self.consumers[0][1], c, b0, spat[0], ["stream"],
                    more_producers=[(p, b) for _, p, b in rest],
                    more_consumers=[(name, sp) for (_, name), sp in
                                    zip(self.consumers[1:], spat[1:], strict=True)],
                    maps_in=self.maps_in, maps_out=self.maps_out)


def find_sites(model: nn.Module, stream: bool = False) -> SiteReport:
    """All sites of `model` in execution order, plus the reason each other producer is not one.
    With `stream`, residual streams (tied groups) are sites too."""
    gm, modules, calls = _graph(model)
    rep = _find_sites(gm, modules, calls)
    if not stream:
        return rep
    streams, refused = _stream_sites(gm, modules, calls)
    pos = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    merged = [(pos[s.producer], s) for s in rep.sites] + streams
    skipped = dict(rep.skipped)
    for _, s in streams:
        for p, _ in s.producers:
            skipped.pop(p, None)
    for first, why in refused.items():
        skipped[first] = f"residual stream not projectable: {why}"
    return SiteReport([s for _, s in sorted(merged, key=lambda t: t[0])], skipped)


def _graph(model: nn.Module) -> tuple[fx.GraphModule, dict[str, nn.Module], dict[str, int]]:
    """The traced graph, its modules, and how often each module is called."""
    gm = trace(model)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    return gm, dict(gm.named_modules()), calls


def _find_sites(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int]
                ) -> SiteReport:
    """Single-producer, single-consumer sites (the paper's)."""
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], PRODUCERS):
            continue
        found = _Chain(node, modules, calls).follow()
        if isinstance(found, Site):
            sites.append(found)
        else:
            skipped[str(node.target)] = found
    return SiteReport(sites, skipped)


class _Chain:
    """One producer's output followed through channel-wise work to its consumer: `follow()`
    is the Site, or why there is none."""

    def __init__(self, node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]
                 ) -> None:
        self.node, self.modules, self.calls = node, modules, calls
        self.name = str(node.target)
        self.prod = modules[self.name]
        self.groups = self.prod.groups if isinstance(self.prod, nn.Conv2d) else 1
        self.c = _out_channels(self.prod)
        self.bn: str | None = None
        self.ops: list[str] = []
        self.mids: list[str] = []
        self.gates: list[tuple[str, str]] = []
        self.flat = False

    def follow(self) -> Site | str:
        if is_depthwise(self.prod):
            return (f"depthwise conv (groups={self.groups}): narrowed only with the site "
                    f"that feeds it")
        if self.calls[self.name] != 1:
            return "module is called more than once"
        cur = self.node
        while True:
            nxt = self._gate(cur)
            if nxt is None:
                users = list(cur.users)
                if len(users) != 1:
                    return (f"output of {_describe(cur, self.modules)} has {len(users)} "
                            f"readers" + (" (a residual or concatenation)" if len(users) > 1
                                          else ""))
                nxt = users[0]
                step = self._step(cur, nxt)
                if step is not None:
                    return step
            cur = nxt

    def _gate(self, cur: fx.Node) -> fx.Node | None:
        """A squeeze-excitation gate on the channels (selected with the site): its multiply."""
        users = list(cur.users)
        if len(users) != 2 or self.flat or self.groups != 1:
            return None
        gate = _gate(cur, users, self.modules, self.calls, self.c)
        if gate is None:
            return None
        mul, reader, writer = gate
        self.gates.append((reader, writer))
        self.ops.append(f"gate {reader}->{writer}")
        return mul

    def _step(self, cur: fx.Node, nxt: fx.Node) -> Site | str | None:
        """Take `nxt` into the chain (None: go on), or end it: the Site, or why not."""
        if nxt.op == "call_function" and nxt.target is torch.cat:
            return f"feeds {_describe(nxt, self.modules)} (a concatenation)"
        if nxt.args[:1] != (cur,):
            return f"feeds {_describe(nxt, self.modules)} as a non-first argument"
        m = self.modules.get(str(nxt.target)) if nxt.op == "call_module" else None
        once = m is not None and self.calls[str(nxt.target)] == 1
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            return f"{nxt.target} normalises with batch statistics (track_running_stats=False)"
        if once and isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) \
                and m.num_features == self.c and _bn_ok(m):
            if self.bn is None and not self.ops and not self.mids:
                self.bn = str(nxt.target)  # folded into the producer
            else:
                self.mids.append(str(nxt.target))  # selected with the channels
                self.ops.append(_describe(nxt, self.modules))
            return None
        if once and is_depthwise(m) and m.in_channels == self.c:  # type: ignore[union-attr]
            if self.groups != 1:
                return f"a depthwise conv {nxt.target} follows a grouped producer"
            if not self.flat:
                self.mids.append(str(nxt.target))
                self.ops.append(_describe(nxt, self.modules))
                return None
        if m is not None and isinstance(m, PRODUCERS) and once:
            return self._consumer(nxt, m)
        if _is_channelwise(nxt, self.modules):
            self.ops.append(_describe(nxt, self.modules))
            return None
        if _is_flatten(nxt, self.modules) and not self.flat:
            self.flat = True
            self.ops.append(_describe(nxt, self.modules))
            return None
        if nxt.op == "call_function" and nxt.target in (operator.add, torch.add, torch.cat):
            return f"feeds {_describe(nxt, self.modules)} (a residual addition or concatenation)"
        if nxt.op == "output":
            return "is the model output"
        return f"feeds {_describe(nxt, self.modules)}, which is not channel-wise"

    def _consumer(self, nxt: fx.Node, m: nn.Module) -> Site | str:
        """The layer that reads the channels: the Site, or why it cannot be one."""
        c = self.c
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            if c % m.groups or m.groups == c or self.groups not in (1, m.groups) or self.mids:
                return (f"consumer {nxt.target} is a grouped conv (groups={m.groups}) that "
                        f"cannot keep equal groups of these {c} channels")
            self.groups = m.groups
        if isinstance(m, nn.Conv2d) and self.flat:
            return f"consumer {nxt.target} is a conv after a flatten"
        in_feat = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        if in_feat % c:
            return f"consumer {nxt.target} reads {in_feat} features from {c} channels"
        if isinstance(m, nn.Linear) and isinstance(self.prod, nn.Conv2d) and not self.flat \
                and in_feat != c:
            return f"consumer {nxt.target} is a Linear on an unflattened feature map"
        return Site(self.name, str(nxt.target), c, self.bn, in_feat // c, self.ops,
                    mids=self.mids, groups=self.groups, gates=self.gates)


def require_sites(model: nn.Module, stream: bool = False) -> list[Site]:
    """find_sites, or a one-line error naming the first layer and the pattern that stops it."""
    rep = find_sites(model, stream)
    if not rep.sites:
        if not rep.skipped:
            raise CaprojError(f"{type(model).__name__} has no Conv2d/Linear layer to compress")
        # Name the most common obstacle (the first layer is usually the stem, not the point).
        kinds: dict[str, list[tuple[str, str]]] = {}
        for name, why in rep.skipped.items():
            kind = ("a grouped/depthwise conv" if "grouped" in why else
                    "a residual addition or concatenation" if "readers" in why or
                    "residual" in why or "concatenation" in why else "another pattern")
            kinds.setdefault(kind, []).append((name, why))
        kind, cases = max(kinds.items(), key=lambda kv: len(kv[1]))
        first, why = cases[0]
        raise CaprojError(f"no compressible site in {type(model).__name__}: "
                          f"{len(cases)} of {len(rep.skipped)} producers meet {kind}, "
                          f"e.g. {first} {why}")
    return rep.sites


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, BatchNorm) for every Conv2d/Linear whose output only a BN reads (each called
    once), in execution order: the layers whose weights' scale BN makes irrelevant to the
    forward function in training mode (see `caproj.surgery.match_weight_scale`)."""
    gm, modules, calls = _graph(model)
    pairs = []
    for node in gm.graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or not isinstance(modules[name], PRODUCERS) \
                or calls[name] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = str(user.target)
        if user.op == "call_module" and isinstance(
                modules[bn], nn.modules.batchnorm._BatchNorm) and calls[bn] == 1:
            pairs.append((name, bn))
    return pairs
