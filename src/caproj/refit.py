"""The cascaded least-squares refit of consumers, walking the traced graph once.

Each consumer of a narrowed site gets the closed-form weight W' minimising
    ||X' W' - Y||^2 + lambda ||W' - W0||^2
over the calibration images, where X' is its input in the *narrow* network (whose earlier
consumers are already refitted: the cascade) and Y its output in the original one; W0 is zero
or a prior (the original consumer read through P). Consumers are refitted in the order the
network runs them.

With `block_targets`, a consumer whose output reaches a residual addition only through
BatchNorms is fitted to the original's *block* output instead: Y + (s - s') / a, where s and s'
are the addition's other operand (the skip) in the original and the narrow network and a the
BNs' per-channel scale. The consumer then also absorbs the error the narrow network has
accumulated in the stream so far (GPTQ's error feedback, at the block level).

Both networks are run node by node through their torch.fx graphs (`Walk`), one batch state per
calibration batch, paused at each consumer: the refit costs one forward pass of each network
when the paused activations fit in memory (GPTQ's sequential calibration), and falls back to
re-running the prefix for every consumer when they do not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from caproj import dist, sites
from caproj.resume import raise_if_stopped
from caproj.surgery import bn_scale, load_tensors
from caproj.utils import available_memory

log = logging.getLogger(__name__)
MEMORY_SHARE = 0.5  # of the available memory the paused activations may take


@dataclass
class Cursor:
    """One batch's progress through a graph: the live values and the next node to run."""

    x: torch.Tensor
    env: dict[fx.Node, object] = field(default_factory=dict)
    at: int = 0


class Walk:
    """A traced network run node by node; a value is dropped after its last use."""

    def __init__(self, model: nn.Module) -> None:
        self.gm = sites.trace(model)
        self.nodes = list(self.gm.graph.nodes)
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        self.dead_after: dict[int, list[fx.Node]] = {}
        for n, i in last.items():
            self.dead_after.setdefault(i, []).append(n)
        self.interp = fx.Interpreter(self.gm, garbage_collect_values=False)
        self.first_call: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                self.first_call.setdefault(str(n.target), i)

    def call_order(self, names: set[str]) -> list[str]:
        """`names` (module names) in the order the network first calls them."""
        return sorted((n for n in names if n in self.first_call), key=self.first_call.get)

    def advance(self, c: Cursor, stop: int, peak: list[int] | None = None) -> None:
        """Run `c` up to node `stop` (exclusive); `peak`: track the most bytes held."""
        while c.at < stop:
            i, n = c.at, self.nodes[c.at]
            if n.op == "placeholder":  # the batch, then defaults of any further arguments
                c.env[n] = c.x if i == 0 else (n.args[0] if n.args else None)
            elif n.op != "output":
                self.interp.env = c.env
                c.env[n] = self.interp.run_node(n)
            if peak is not None:
                peak[0] = max(peak[0], sum(v.numel() * v.element_size() for v in c.env.values()
                                           if isinstance(v, torch.Tensor)))
            for dead in self.dead_after.get(i, ()):
                c.env.pop(dead, None)
            c.at += 1

    def input_of(self, c: Cursor, name: str) -> torch.Tensor:
        """The first input of module `name`'s first call (the cursor pauses before it)."""
        i = self.first_call[name]
        self.advance(c, i)
        self.interp.env = c.env
        args, _ = self.interp.fetch_args_kwargs_from_env(self.nodes[i])
        return args[0]

    def output_of(self, c: Cursor, name: str) -> torch.Tensor:
        """The output of module `name`'s first call (the cursor runs it)."""
        i = self.first_call[name]
        self.advance(c, i + 1)
        return c.env[self.nodes[i]]  # type: ignore[return-value]

    def value_of(self, c: Cursor, node: fx.Node) -> torch.Tensor:
        """`node`'s value for `c`'s batch without moving `c`: from its live values, or, when the
        graph computes it later (a shortcut after the block's body), by running a copy."""
        if node in c.env:
            return c.env[node]  # type: ignore[return-value]
        ahead = Cursor(c.x, dict(c.env), c.at)
        self.advance(ahead, self.nodes.index(node) + 1)
        return ahead.env[node]  # type: ignore[return-value]

    def peak_bytes(self, x: torch.Tensor) -> int:
        peak = [0]
        self.advance(Cursor(x), len(self.nodes), peak)
        return peak[0]


def residual_skip(walk: Walk, name: str) -> tuple[str, list[str]] | None:
    """(the skip's node name, the BatchNorms in between) when module `name`'s only path out is
    BatchNorms then a residual addition; None otherwise."""
    mods = dict(walk.gm.named_modules())
    node, bns = walk.nodes[walk.first_call[name]], []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(mods[str(user.target)], nn.modules.batchnorm
                                                   ._BatchNorm):
            node = user
            bns.append(str(user.target))
            continue
        if user.op == "call_function" and user.target in sites.ADD_FUNCTIONS:
            others = [a for a in user.args[:2] if isinstance(a, fx.Node) and a is not node]
            return (others[0].name, bns) if len(others) == 1 and len(user.args) == 2 else None
        return None
    return None


def design(module: nn.Module, xin: torch.Tensor) -> torch.Tensor:
    """One batch's least-squares inputs as N x G x d x L: a Conv2d's unfolded patches
    (channel-major, one system per group), a Linear's rows (every leading dimension a sample)
    as 1 x 1 x d x rows."""
    xin = xin.float()
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(xin, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.reshape(cols.shape[0], module.groups, -1, cols.shape[-1])
    return xin.reshape(-1, xin.shape[-1]).T[None, None]


def gram(module: nn.Module, xin: torch.Tensor) -> tuple[torch.Tensor, int]:
    """X^T X of one batch for an ungrouped Conv2d or a Linear (`design`), in float64, and the
    rows it adds."""
    cols = design(module, xin)
    return (torch.einsum("ngkl,ngjl->kj", cols, cols).double(),
            cols.shape[0] * cols.shape[-1])


def normal_equations(module: nn.Module, xin: torch.Tensor, y: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(X^T X, X^T Y) of one batch (`design`: one system per group of a Conv2d), float64, the
    bias taken out."""
    y = y.float()
    if getattr(module, "bias", None) is not None:
        y = y - (module.bias if isinstance(module, nn.Linear) else
                 module.bias.view(1, -1, *([1] * (y.dim() - 2))))
    cols = design(module, xin)
    if isinstance(module, nn.Conv2d):
        yy = y.reshape(y.shape[0], module.groups, y.shape[1] // module.groups, -1)  # N G o L
    else:
        yy = y.reshape(-1, y.shape[-1]).T[None, None]
    g = torch.einsum("ngkl,ngjl->gkj", cols, cols)
    c = torch.einsum("ngkl,ngol->gko", cols, yy)
    return g.double(), c.double()


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a batch of symmetric positive definite systems (ridge-regularised Gram matrices) by
    Cholesky, one system at a time: batched LU solves hang in some MKL builds with several
    threads (seen with torch 2.14 on 2 threads). Falls back to LU for a system that is not
    numerically positive definite."""
    out = []
    for ai, bi in zip(a, b, strict=True):
        chol, info = torch.linalg.cholesky_ex(ai)
        out.append(torch.cholesky_solve(bi, chol) if int(info) == 0
                   else torch.linalg.solve(ai, bi))
    return torch.stack(out)


def solve(gram: torch.Tensor, cross: torch.Tensor, w_old: torch.Tensor, ridge: float,
          prior: torch.Tensor | None = None, *, anchor: torch.Tensor | None = None,
          anchor_weight: float = 0.0) -> torch.Tensor:
    """The ridge solution in `w_old`'s layout (out, in/G, k, k); the ridge is relative to the
    mean Gram diagonal and pulls toward `prior` (same layout as the solution) or zero.
    `anchor_weight` (also relative to the mean diagonal) adds a second pull, toward `anchor`."""
    d = gram.shape[-1]
    mean_diag = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[:, None, None] / d

    def layout(w: torch.Tensor) -> torch.Tensor:  # G x d x o/G
        return w.double().reshape(gram.shape[0], -1, d).transpose(1, 2)

    lam = ridge * mean_diag + 1e-12
    if prior is not None:
        cross = cross + lam * layout(prior)
    if anchor is not None and anchor_weight > 0:
        lam2 = anchor_weight * mean_diag
        cross, lam = cross + lam2 * layout(anchor), lam + lam2
    sol = spd_solve(gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device), cross)
    w = sol.transpose(1, 2).reshape(-1, d).float()  # (G o) x (c'/G k k)
    if w_old.dim() == 4:
        w = w.reshape(w_old.shape[0], -1, *w_old.shape[2:])
    return w.contiguous()


def samples(module: nn.Module, y: torch.Tensor) -> int:
    """How many rows a batch adds to `module`'s least-squares system (`normal_equations`)."""
    if isinstance(module, nn.Conv2d):
        return y.shape[0] * y[0, 0].numel()
    return y.numel() // y.shape[-1]


@torch.no_grad()
def cascade(original: nn.Module, narrow: nn.Module, calib: Sequence[torch.Tensor],
            consumers: set[str], *, ridge: float,
            prior: Callable[[str], torch.Tensor] | None,
            solved: Callable[[str, torch.Tensor], Mapping[str, torch.Tensor]],
            block_targets: bool = False, damping: float = 0.0,
            projected: Callable[[str], torch.Tensor] | None = None) -> list[str]:
    """Refit every module of `consumers` in call order. `narrow` holds the current narrow
    weights; `solved(name, w)` records a solution and returns the narrow network's tensors
    with it, which are loaded before the walk goes on. `block_targets`: fit consumers that
    close a residual block to the original's block output (module docstring). `damping`: the
    pull toward `projected(name)` (the original consumer read through P) counts as `damping`
    samples per input of the system, so a system with few samples per unknown (a classifier
    refitted from a few hundred pooled images) stays near the original. Returns the order."""
    with sites.traced_on(calib[0]):  # forwards that branch on their input's shape
        walk_n, walk_o = Walk(narrow), Walk(original)
    order = walk_o.call_order(consumers)
    omods = dict(original.named_modules())
    one = calib[0][:1]  # activations grow with the batch: one image's walk sizes them all
    need = (walk_n.peak_bytes(one) + walk_o.peak_bytes(one)) * sum(len(x) for x in calib)
    keep = need <= MEMORY_SHARE * available_memory(calib[0].device)
    if not keep:
        log.info("refit: the paused activations would take %.1f GB; re-running each prefix",
                 need / 2**30)
    cursors = [(Cursor(x), Cursor(x)) for x in calib] if keep else None
    named_n = {n.name: n for n in walk_n.nodes}
    named_o = {n.name: n for n in walk_o.nodes}
    for name in order:
        raise_if_stopped("the least-squares refit")
        skip = residual_skip(walk_o, name) if block_targets else None
        gram = cross = None
        rows = 0
        for k, x in enumerate(calib):
            cn, co = cursors[k] if cursors is not None else (Cursor(x), Cursor(x))
            xin, y = walk_n.input_of(cn, name), walk_o.output_of(co, name)
            if skip is not None:
                s_n = walk_n.value_of(cn, named_n[skip[0]])
                s_o = walk_o.value_of(co, named_o[skip[0]])
                if s_n.shape == s_o.shape == y.shape:
                    a = bn_scale([omods[b] for b in skip[1]])
                    if isinstance(a, torch.Tensor):
                        a = a.view(1, -1, *([1] * (y.dim() - 2)))
                    y = y + (s_o - s_n) / a
            g, c = normal_equations(omods[name], xin, y)
            rows += samples(omods[name], y)
            gram = g if gram is None else gram + g
            cross = c if cross is None else cross + c
        assert gram is not None and cross is not None
        dist.all_reduce_(gram)
        dist.all_reduce_(cross)
        w_old = omods[name].weight
        rows = int(dist.all_reduce_(torch.tensor(float(rows), dtype=torch.float64,
                                                  device=gram.device)).item())
        damped = damping > 0 and projected is not None
        w = solve(gram, cross, w_old, ridge, prior(name) if prior is not None else None,
                  anchor=projected(name) if damped else None,
                  anchor_weight=damping * gram.shape[-1] / max(rows, 1) if damped else 0.0)
        load_tensors(narrow, solved(name, w))
    return order
