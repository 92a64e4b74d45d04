"""Latency budgets: a per-layer latency model measured on the runtime the user deploys to.

MACs are not time: a thin convolution runs at a fraction of a wide one's arithmetic rate, and
at batch 1 per-operator overhead does not shrink with the channels. Following ChamNet's
look-up tables, the latency of a network at any per-site widths `w` is predicted as

    T(w) = T_full + sum over layers l of [ t_l(c_in_l(w), c_out_l(w)) - t_l(c_in_l, c_out_l) ]

- `T_full`: the measured latency of the whole original network in the runtime (everything the
  widths do not change is in it: the stem, pooling, adds, per-operator overhead), measured
  interleaved with the narrowest network the grid allows; the layer differences are scaled
  by one factor so that the prediction there equals that measurement (`calibrate`);
- `t_l`: the measured time of a standalone copy of layer l (conv or linear + ReLU, random
  weights, the same kernel, stride, groups and input size) in the same runtime, batch, threads
  and device, on a grid of candidate widths per side (the multiples of the site's channel step,
  spaced by a power of two so that at most `GRID` points remain), the widths of one layer
  timed interleaved in rounds; linearly interpolated between grid points.

On CPU every measurement runs with glibc's malloc thresholds fixed (`utils.steady_allocator`,
recorded as `allocator` in the cache key and the reports): with glibc's defaults a batch-64
forward faults its activations in again and again, and the process switches between two
speeds whose ratio to a narrowed network differs by up to 20 %.

Only layers a site narrows are measured: producers (output side), consumers (input side),
depthwise convs inside a site (both sides), squeeze-excitation readers and writers. The layer
times are cached on disk (`cache_dir()`: one JSON per machine, runtime, batch, threads and
library versions), so a second compression on the same machine measures only `T_full`.

`LatencyModel.build(model, sites, input_shape, spec)` measures; `.predict(widths)` is the
budget solver's cost; `.measure(model, small)` times original and compressed interleaved.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caproj import deploy, metrics, projection, surgery
from caproj.budget import site_step
from caproj.errors import CaprojError
from caproj.sites import Site
from caproj.utils import atomic_write_bytes, steady_allocator

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "inductor", "onnxruntime")
GRID = 16  # at most this many measured widths per site
PROTOCOL = 2  # how layer times are taken; part of the cache key, so a change re-measures


@dataclass(frozen=True)
class Spec:
    """Where latency is measured: runtime, batch size, CPU threads, device."""

    runtime: str = "eager"
    batch: int = 1
    threads: int | None = None  # None: torch's current setting
    device: str = "cpu"

    def check(self) -> Spec:
        if self.runtime not in RUNTIMES:
            raise CaprojError(f"runtime must be one of {', '.join(RUNTIMES)}, got "
                              f"{self.runtime!r}", param="runtime")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise CaprojError(f"latency_batch must be an integer >= 1, got {self.batch!r}",
                              param="latency_batch")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise CaprojError(f"threads must be an integer >= 1, got {self.threads!r}",
                              param="threads")
        return self

    def resolved_threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def allocator(self) -> str:
        """How host memory is allocated while measuring: CPU runtimes measure with glibc's
        thresholds fixed (`utils.steady_allocator`, applied by the first call in a process),
        where the platform allows."""
        if self.runtime != "onnxruntime" and self.device.startswith("cuda"):
            return "device"
        return "steady" if steady_allocator() else "system"


def machine(device: str = "cpu") -> str:
    """What the measurements belong to: the CPU model, or the GPU's name."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def versions(runtime: str) -> dict[str, str]:
    v = {"torch": torch.__version__}
    if runtime == "onnxruntime":
        try:
            import onnxruntime

            v["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            raise CaprojError("runtime 'onnxruntime' needs onnxruntime: pip install -e "
                              "'.[export]'", param="runtime") from None
    return v


def cache_dir() -> Path:
    """$CAPROJ_CACHE/latency, else $XDG_CACHE_HOME/caproj/latency, else ~/.cache/..."""
    root = os.environ.get("CAPROJ_CACHE")
    if root:
        return Path(root) / "latency"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "caproj" / "latency"


# ------------------------------------------------------------------------------ layers
@dataclass(frozen=True)
class Layer:
    """A measurable layer at full width: a conv (kernel, stride, padding, dilation, groups) or
    a linear layer, with the input shape it sees (channels first; tokens: channels last)."""

    kind: str  # "conv" | "linear"
    c_in: int
    c_out: int
    in_shape: tuple[int, ...]  # without the batch; c_in at dim 0 (conv) or -1 (linear)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    depthwise: bool = False  # groups == c_in: groups follow the width
    bias: bool = True

    def key(self, ci: int, co: int) -> str:
        return json.dumps([asdict(self), ci, co], sort_keys=True)

    def module(self, ci: int, co: int) -> tuple[nn.Module, tuple[int, ...]]:
        """A standalone copy at widths (ci, co), with a ReLU after it, and its input shape."""
        if self.kind == "conv":
            g = ci if self.depthwise else self.groups
            conv = nn.Conv2d(ci, co, self.kernel, self.stride, self.padding,  # type: ignore[arg-type]
                             self.dilation, g, self.bias)
            return nn.Sequential(conv, nn.ReLU()), (ci, *self.in_shape[1:])
        shape = (*self.in_shape[:-1], ci)
        return nn.Sequential(nn.Linear(ci, co, self.bias), nn.ReLU()), shape


def _layer_of(m: nn.Module, in_shape: tuple[int, ...]) -> Layer | None:
    if isinstance(m, nn.Conv2d) and len(in_shape) == 3:
        dw = m.groups > 1 and m.groups == m.in_channels
        return Layer("conv", m.in_channels, m.out_channels, tuple(in_shape),
                     tuple(m.kernel_size), tuple(m.stride),
                     m.padding if isinstance(m.padding, str) else tuple(m.padding),
                     tuple(m.dilation), m.groups, dw, m.bias is not None)
    if isinstance(m, nn.Linear):
        return Layer("linear", m.in_features, m.out_features, tuple(in_shape),
                     bias=m.bias is not None)
    return None


@dataclass
class Side:
    """How one side (input or output channels) of a layer follows a site's width."""

    site: int
    full: int  # this side's channels at full width (a flattened linear: channels x spatial)
    channels: int  # the site's channels
    grid: list[int]  # the site widths measured

    def at(self, k: int) -> int:
        return self.full * k // self.channels


@dataclass
class Entry:
    name: str
    layer: Layer
    side_in: Side | None
    side_out: Side | None
    times: dict[tuple[int, int], float] = field(default_factory=dict)  # (k_in, k_out) -> ms

    @property
    def same(self) -> bool:
        """Both sides follow one site (a depthwise conv inside it): only the diagonal."""
        return bool(self.side_in and self.side_out and self.side_in.site == self.side_out.site)

    def points(self) -> list[tuple[int, int]]:
        if self.same:
            return [(k, k) for k in self.side_in.grid]  # type: ignore[union-attr]
        return [(a, b) for a in (self.side_in.grid if self.side_in else [-1])
                for b in (self.side_out.grid if self.side_out else [-1])]

    def widths(self, w: list[int]) -> tuple[int, int]:
        ki = w[self.side_in.site] if self.side_in else -1
        ko = w[self.side_out.site] if self.side_out else -1
        return ki, ko

    def time(self, ki: int, ko: int) -> float:
        """Bilinear interpolation over the measured grid (site widths on each varying side)."""
        if self.same:
            return sum(wi * self.times[(a, a)] for a, wi in _weights(self.side_in, ki))
        return sum(wi * wo * self.times[(a, b)] for a, wi in _weights(self.side_in, ki)
                   for b, wo in _weights(self.side_out, ko))


def _weights(side: Side | None, k: int) -> list[tuple[int, float]]:
    """Grid points and weights interpolating width k linearly (extrapolating below the
    first point; the full width is the last)."""
    if side is None:
        return [(-1, 1.0)]
    g = side.grid
    if len(g) == 1 or k >= g[-1]:
        return [(g[-1], 1.0)]
    i = max(1, bisect.bisect_left(g, k))
    a, b = g[i - 1], g[i]
    f = (k - a) / (b - a)
    return [(a, 1 - f), (b, f)]


def site_grid(c: int, step: int, limit: int = GRID) -> tuple[int, list[int]]:
    """The widths measured for a site of c channels, and their spacing: the multiples of
    step x 2^j (the smallest j leaving at most `limit` of them) and c itself. A power-of-two
    spacing keeps the widths CPU kernels block well (multiples of 16, 32, ...) on the grid;
    the latency budget chooses widths on it, so a prediction is a sum of measured times."""
    spacing = step
    while c // spacing > limit - 1 and spacing < c:
        spacing *= 2
    grid = list(range(spacing, c + 1, spacing))
    if not grid or grid[-1] != c:
        grid.append(c)
    return spacing, grid


def site_grids(sites: list[Site], multiple: int) -> list[tuple[int, list[int]]]:
    return [site_grid(s.channels, site_step(s.channels, multiple, s.groups)) for s in sites]


def site_layers(model: nn.Module, sites: list[Site], input_shape: tuple[int, ...],
                multiple: int) -> list[Entry]:
    """Every conv/linear layer whose width a site changes, with the sides that follow it."""
    ins: dict[str, int] = {}
    outs: dict[str, int] = {}
    for i, s in enumerate(sites):
        for p, _ in s.producers:
            outs[p] = i
        for c, _ in s.consumers:
            ins[c] = i
        for m in s.mids:
            ins[m] = outs[m] = i
        for reader, writer in s.gates:
            ins[reader] = i
            outs[writer] = i
    grids = site_grids(sites, multiple)
    mods = dict(model.named_modules())
    names = [n for n in mods if n in ins or n in outs]
    shapes = {r["layer"]: r["in_shape"] for r in metrics.layer_table(model, input_shape)}
    entries = []
    for n in names:
        layer = _layer_of(mods[n], shapes.get(n, ()))
        if layer is None:  # a BN inside a site: elementwise, left in T_full
            continue

        def side(i: int | None, full: int) -> Side | None:
            if i is None:
                return None
            s = sites[i]
            return Side(i, full, s.channels, grids[i][1])

        entries.append(Entry(n, layer, side(ins.get(n), layer.c_in),
                             side(outs.get(n), layer.c_out)))
    return entries


# ------------------------------------------------------------------------------ timing
@contextlib.contextmanager
def _compile_room(n: int) -> Iterator[None]:
    """Room in dynamo's cache for n compiled copies of one module class alive at once (beyond
    its limit dynamo would silently run the rest uncompiled)."""
    cfg = torch._dynamo.config
    old = cfg.cache_size_limit, cfg.accumulated_cache_size_limit
    cfg.cache_size_limit = max(old[0], n + 8)
    cfg.accumulated_cache_size_limit = max(old[1], n + 8)
    try:
        yield
    finally:
        cfg.cache_size_limit, cfg.accumulated_cache_size_limit = old


def _input(shape: tuple[int, ...], spec: Spec, device: str) -> torch.Tensor:
    x = torch.randn(spec.batch, *shape, device=device)
    if spec.runtime == "inductor" and x.dim() == 4:  # as its form runs: no conversion timed
        x = x.contiguous(memory_format=torch.channels_last)
    return x


FORM = {"eager": "fold_bn", "inductor": "inductor", "onnxruntime": "onnxruntime"}


def _runtime_form(m: nn.Module, spec: Spec, shape: tuple[int, ...],
                  layer: bool = False) -> nn.Module:
    """`m` as the runtime runs it (`deploy.for_inference`; eager: BN folded, as deployed).
    `layer`: a standalone layer, fed `_input`'s layout (inductor: channels_last, compiled for
    it, so each copy compiles once). Inductor callers reset dynamo (or make room in its cache)
    first."""
    return deploy.for_inference(m, FORM[spec.runtime], shape, batch=spec.batch,
                                threads=spec.resolved_threads(), channels_last_input=layer)


LAYER_SECONDS = 0.3  # timing per measured layer width
ROUNDS = 5  # interleaved rounds over a layer's widths (batch 1; x3 for larger batches)


def _rounds(batch: int) -> tuple[int, int]:
    """(rounds, forwards per model per round) for interleaved whole-network timing. At batch
    1 a forward is short and 5 in a row are steady. At larger batches (tens of ms, a working
    set of megabytes) this VM's speed switches between modes within seconds (the same pair of
    ResNet-20s measured 1.26x-1.85x apart in 6 repeats of 6 rounds of 5 forwards), so the
    models alternate every forward, 60 rounds (1.73x-1.82x on the same pair, same minutes)."""
    return (15, 5) if batch == 1 else (60, 1)


class Table:
    """The on-disk cache of layer times for one machine, runtime, batch, threads, versions."""

    def __init__(self, spec: Spec, directory: Path | None = None) -> None:
        self.spec = spec
        dev = "cpu" if spec.runtime == "onnxruntime" else spec.device
        ident = {"machine": machine(dev), "runtime": spec.runtime, "batch": spec.batch,
                 "threads": spec.resolved_threads(), "device": dev,
                 "allocator": spec.allocator(), "protocol": PROTOCOL,
                 **versions(spec.runtime)}
        self.ident = ident
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        self.path = (directory or cache_dir()) / f"{spec.runtime}-b{spec.batch}-{digest}.json"
        self.times: dict[str, float] = {}
        self.measured = 0  # layer times measured (not found in the cache) by this object
        self.changed = False  # something else to save (a network's calibration)
        if self.path.exists():
            try:
                self.times = json.loads(self.path.read_text())["times"]
            except (OSError, ValueError, KeyError):
                log.warning("latency cache %s unreadable; measuring again", self.path)

    def get_many(self, layer: Layer, widths: list[tuple[int, int]]) -> list[float]:
        """Times of `layer` at each (c_in, c_out); the ones not cached are measured together,
        interleaved: every width is timed once per round, `ROUNDS` rounds, and each keeps the
        median of its rounds, so the machine's drift during the measurement hits all widths
        of a layer alike (the differences between them are what a prediction uses)."""
        todo = [w for w in dict.fromkeys(widths) if layer.key(*w) not in self.times]
        if todo:
            dev = "cpu" if self.spec.runtime == "onnxruntime" else self.spec.device
            with metrics.threads(self.spec.resolved_threads()), _compile_room(len(todo)):
                if self.spec.runtime == "inductor":
                    torch._dynamo.reset()
                forms, inputs = [], []
                for ci, co in todo:
                    torch.manual_seed(0)
                    mod, shape = layer.module(ci, co)
                    forms.append(_runtime_form(mod.to(dev), self.spec, shape, layer=True))
                    inputs.append(_input(shape, self.spec, dev))
                n_rounds = ROUNDS if self.spec.batch == 1 else 3 * ROUNDS
                per = len(todo) * n_rounds
                rounds: list[list[float]] = [[] for _ in todo]
                with torch.inference_mode():
                    for m, x in zip(forms, inputs, strict=True):  # warm-up
                        metrics.median_time(m, x, LAYER_SECONDS / 3, runs=2)
                    for _ in range(n_rounds):
                        for i, (m, x) in enumerate(zip(forms, inputs, strict=True)):
                            rounds[i].append(metrics.median_time(
                                m, x, LAYER_SECONDS * len(todo) / per,
                                runs=3 if self.spec.batch == 1 else 1))
            for w, r in zip(todo, rounds, strict=True):
                self.times[layer.key(*w)] = statistics.median(r)
            self.measured += len(todo)
        return [self.times[layer.key(*w)] for w in widths]

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json.dumps({"ident": self.ident, "times": self.times},
                                          indent=0).encode(), self.path)
        except OSError as e:  # a cache that cannot be written costs time, not the result
            log.warning("latency cache not written (%s): %s", self.path, e)


@dataclass
class LatencyModel:
    spec: Spec
    full_ms: float  # the original network, measured
    entries: list[Entry]
    full_widths: list[int]
    measured_layers: int = 0  # layer times measured now (the rest came from the cache)
    cache: str = ""
    steps: list[int] = field(default_factory=list)  # per site: the grid's spacing
    scale: float = 1.0  # layer-time differences x this (calibrate)
    floor_ratio: float = math.nan  # the narrowest widths' measured latency / the original's
    floor: list[int] = field(default_factory=list)  # the narrowest widths on the grid

    @classmethod
    def build(cls, model: nn.Module, sites: list[Site], input_shape: tuple[int, ...],
              spec: Spec, multiple: int = 8, cache: Path | None = None,
              progress: Callable[[int, int], None] | None = None) -> LatencyModel:
        spec = spec.check()
        entries = site_layers(model, sites, input_shape, multiple)
        table = Table(spec, cache)
        n_points = sum(len(e.points()) for e in entries)
        log.info("latency model (%s, batch %d, %d threads): %d layers, %d layer widths, "
                 "cache %s", spec.runtime, spec.batch, spec.resolved_threads(), len(entries),
                 n_points, table.path)
        grids = site_grids(sites, multiple)
        lm = cls(spec, 0.0, entries, [s.channels for s in sites], 0, str(table.path),
                 [g[0] for g in grids])
        try:
            for n, e in enumerate(entries):
                pts = e.points()
                widths = [(e.side_in.at(a) if e.side_in else e.layer.c_in,
                           e.side_out.at(b) if e.side_out else e.layer.c_out) for a, b in pts]
                for p, t in zip(pts, table.get_many(e.layer, widths), strict=True):
                    e.times[p] = t
                if progress:
                    progress(n + 1, len(entries))
            lm.calibrate(model, sites, input_shape, [g[1][0] for g in grids], table)
        finally:
            if table.measured or table.changed:
                table.save()
        lm.measured_layers = table.measured
        log.info("latency model: original %.3f ms, layer times x %.2f; %d layer times "
                 "measured, the rest from the cache or repeated layers", lm.full_ms, lm.scale,
                 table.measured)
        return lm

    def calibrate(self, model: nn.Module, sites: list[Site], input_shape: tuple[int, ...],
                  floor: list[int], table: Table | None = None) -> None:
        """Measure the original and the narrowest network (`floor` widths) interleaved: the
        original's time is `full_ms`, and the layer times' differences are scaled so that the
        prediction at the floor equals the measured ratio. One factor absorbs the machine's
        drift between the table's measurement and now, and what standalone layers miss (a
        compiler fusing a layer with its neighbours). Kept in `table` for this network, so a
        warm cache gives the same latency model, hence the same widths, run after run."""
        self.floor = list(floor)
        key = "network:" + hashlib.sha256(json.dumps(
            [list(input_shape), floor, self.full_widths,
             [e.layer.key(e.layer.c_in, e.layer.c_out) for e in self.entries]]
        ).encode()).hexdigest()[:16]
        if table is not None and f"{key}:full_ms" in table.times:
            self.full_ms = table.times[f"{key}:full_ms"]
            measured = table.times[f"{key}:floor_ratio"]
        else:
            small = shape_only(model, sites, floor)
            r = compare({"original": model, "floor": small}, input_shape, self.spec, repeats=1)
            self.full_ms = r["original"]["median_ms"]
            measured = 1 / r["floor"]["speedup"]
            if table is not None:
                table.times.update({f"{key}:full_ms": self.full_ms,
                                    f"{key}:floor_ratio": measured})
                table.changed = True
        delta = self.layer_ms(floor) - self.layer_ms(self.full_widths)
        self.floor_ratio = measured
        if delta < 0 and measured < 1:
            self.scale = min(5.0, max(0.2, (measured - 1) * self.full_ms / delta))
        else:  # the table or the measurement sees no gain: trust the table as measured
            self.scale = 1.0

    def layer_ms(self, widths: list[int]) -> float:
        return sum(e.time(*e.widths(widths)) for e in self.entries)

    def predict(self, widths: list[int]) -> float:
        """Predicted latency (ms) of the network narrowed to `widths`: never below the
        narrowest network's measured latency (layer times taken on a busy machine can make the
        scaled differences exceed the whole network's time)."""
        raw = self.full_ms + self.scale * (self.layer_ms(widths)
                                           - self.layer_ms(self.full_widths))
        floor = self.floor_ratio * self.full_ms
        return max(raw, floor) if math.isfinite(floor) else raw

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.spec.runtime, "batch": self.spec.batch,
                "threads": self.spec.resolved_threads(), "device": self.spec.device,
                "allocator": self.spec.allocator(), "original_ms": self.full_ms,
                "layers": len(self.entries),
                "scale": self.scale, "floor_ratio": self.floor_ratio,
                "measured_layer_times": self.measured_layers, "cache": self.cache}


def compare(models: dict[str, nn.Module], input_shape: tuple[int, ...], spec: Spec,
            repeats: int = 3, rounds: int | None = None) -> dict[str, dict[str, Any]]:
    """The models in spec's runtime, measured interleaved (`metrics.compare_latency`) `repeats`
    times; per model the median latency and the median of the repeats' speed-ups over the
    first model, with every repeat's figures."""
    default_rounds, runs = _rounds(spec.batch)
    rounds = rounds or default_rounds
    with metrics.threads(spec.resolved_threads()):
        if spec.runtime == "inductor":
            torch._dynamo.reset()
        forms = {n: _runtime_form(m, spec, input_shape) for n, m in models.items()}
        reps = [metrics.compare_latency(forms, input_shape, spec.batch, rounds=rounds, runs=runs,
                                        warmup_seconds=1.0 if i == 0 else 0.0)
                for i in range(repeats)]
    return {n: {"median_ms": statistics.median(r[n]["median_ms"] for r in reps),
                "speedup": statistics.median(r[n]["speedup"] for r in reps),
                "ratio_noise": statistics.median(r[n]["ratio_noise"] for r in reps),
                "repeats_ms": [r[n]["median_ms"] for r in reps],
                "repeats_speedup": [r[n]["speedup"] for r in reps]} for n in forms}


def prediction_error(predicted_ms: float, measured_ms: float) -> float:
    """(predicted - measured) / measured."""
    return (predicted_ms - measured_ms) / measured_ms if measured_ms > 0 else math.nan


def report(model: nn.Module, small: nn.Module, input_shape: tuple[int, ...], lm: LatencyModel,
           widths: list[int], repeats: int = 3) -> dict[str, Any]:
    """What the user will get: original and compressed measured interleaved in lm's runtime,
    batch and threads (`repeats` runs, medians), next to the prediction."""
    r = compare({"original": model, "compressed": small}, input_shape, lm.spec, repeats)
    pred_ms = lm.predict(widths)
    meas = r["compressed"]["median_ms"]
    ratio = 1 / r["compressed"]["speedup"]
    return {"runtime": lm.spec.runtime, "batch": lm.spec.batch,
            "threads": lm.spec.resolved_threads(), "allocator": lm.spec.allocator(),
            "original_ms": r["original"]["median_ms"],
            "compressed_ms": meas, "speedup": r["compressed"]["speedup"],
            "speedups": r["compressed"]["repeats_speedup"], "predicted_ms": pred_ms,
            "predicted_ratio": pred_ms / lm.full_ms, "measured_ratio": ratio,
            "prediction_error": prediction_error(pred_ms, meas),
            "ratio_error": prediction_error(pred_ms / lm.full_ms, ratio)}


def shape_only(model: nn.Module, sites: list[Site], widths: list[int]) -> nn.Module:
    """The narrowed network for `widths` by channel selection (the first channels of each
    group): the shapes a compression gives, for timing only."""
    dev = next(model.parameters()).device
    return surgery.apply(model, sites, [
        projection.init_select(torch.ones(s.channels, device=dev), k, s.groups)
        for s, k in zip(sites, widths, strict=True)])
