"""Measurement: MACs and params (torch.utils.flop_counter, MACs = FLOPs/2 at batch 1), a
per-layer table, latency (warm-up, median of many runs, fixed threads) and peak activation
memory of a forward pass."""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from caproj.utils import steady_allocator


def probe_input(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(batch, *input_shape, device=device)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at batch 1."""
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(probe_input(model, input_shape))
    model.train(was)
    return fc.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict]:
    """Per leaf module: MACs, params and output shape, in execution order."""
    rows: list[dict] = []
    hooks = []

    def pre(name):
        def f(mod, inp):
            mode = FlopCounterMode(display=False)
            mode.__enter__()
            mod._caproj_fc = mode  # type: ignore[attr-defined]
        return f

    def post(name):
        def f(mod, inp, out):
            mode = mod._caproj_fc
            mode.__exit__(None, None, None)
            del mod._caproj_fc
            rows.append({"layer": name, "type": type(mod).__name__,
                         "macs": mode.get_total_flops() // 2,
                         "params": sum(p.numel() for p in mod.parameters(recurse=False)),
                         "out_shape": tuple(out.shape[1:]) if torch.is_tensor(out) else None,
                         "in_shape": tuple(inp[0].shape[1:])
                         if inp and torch.is_tensor(inp[0]) else None})
        return f

    for name, m in model.named_modules():
        if len(list(m.children())) == 0:
            hooks.append(m.register_forward_pre_hook(pre(name)))
            hooks.append(m.register_forward_hook(post(name)))
    was = model.training
    model.eval()
    try:
        model(probe_input(model, input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return rows


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Latency:
    batch: int
    median_ms: float
    p90_ms: float
    runs: int
    threads: int


@torch.inference_mode()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1,
                    runs: int = 50, warmup: int = 10, num_threads: int | None = None,
                    min_seconds: float = 0.0) -> Latency:
    """Median wall time of a forward pass (eval mode). `runs` timed after `warmup`; keeps timing
    until `min_seconds` have passed as well, so fast models get more samples."""
    model.eval()
    x = probe_input(model, input_shape, batch)
    with threads(num_threads):
        for _ in range(warmup):
            model(x)
        times = _times(model, x, min_seconds, runs)
        q = statistics.quantiles(times, n=10) if len(times) >= 10 else [max(times)] * 9
        return Latency(batch, statistics.median(times), q[8], len(times), torch.get_num_threads())


@torch.inference_mode()
def median_time(model: nn.Module, x: torch.Tensor, seconds: float, runs: int = 5) -> float:
    """Median ms of model(x) over at least `runs` calls and `seconds` (no warm-up)."""
    return statistics.median(_times(model, x, seconds, runs))


def _times(model: nn.Module, x: torch.Tensor, seconds: float, runs: int) -> list[float]:
    """ms of each call of model(x), at least `runs` calls and `seconds` in all (on CPU with
    the steady allocator, `utils.steady_allocator`, as every timing in caproj)."""
    cuda = x.device.type == "cuda"
    if x.device.type == "cpu":
        steady_allocator()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < seconds:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@torch.inference_mode()
def compare_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int = 1,
                    rounds: int = 15, runs: int = 5, warmup: int = 5,
                    num_threads: int | None = None, warmup_seconds: float = 0.0
                    ) -> dict[str, dict[str, float]]:
    """Latency of several models measured interleaved (round-robin, `runs` forwards each per
    round), so that machine noise hits all of them alike. Per model: median over all runs, and
    the median over rounds of (first model's round median / this model's round median)."""
    names = list(models)
    for m in models.values():
        m.eval()
    x = probe_input(next(iter(models.values())), input_shape, batch)
    cuda = x.device.type == "cuda"
    if x.device.type == "cpu":  # freed activations reused, not faulted in again (utils)
        steady_allocator()
    per: dict[str, list[list[float]]] = {n: [] for n in names}
    with threads(num_threads):
        for m in models.values():
            for _ in range(warmup):
                m(x)
            if warmup_seconds:
                median_time(m, x, warmup_seconds, runs=1)
        for _ in range(rounds):
            for n in names:
                ts = []
                for _ in range(runs):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    models[n](x)
                    if cuda:
                        torch.cuda.synchronize()
                    ts.append((time.perf_counter() - t0) * 1e3)
                per[n].append(ts)
    ref = [statistics.median(r) for r in per[names[0]]]
    out = {}
    for n in names:
        meds = [statistics.median(r) for r in per[n]]
        ratios = [b / a for a, b in zip(ref, meds, strict=True)]  # this / the first, per round
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[n] = {"median_ms": statistics.median([t for r in per[n] for t in r]),
                  "speedup": statistics.median([a / b for a, b in zip(ref, meds, strict=True)]),
                  # the rounds' noise: half the interquartile range of the latency ratios
                  "ratio_noise": (q[2] - q[0]) / 2,
                  "threads": torch.get_num_threads() if not num_threads else num_threads}
    return out


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of tensors produced by ops that are still alive, and the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        in_ptrs = {a.untyped_storage().data_ptr() for a in inputs}
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in in_ptrs:
                self.add(t)  # a new buffer, not a view of an input
        return out


@torch.inference_mode()
def peak_activation_bytes(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> int:
    """Peak bytes of live activations (input included, weights excluded) in an eval forward:
    the peak of bytes held by tensors the forward created and had not yet freed. The same
    count on every device (a CUDA allocator's peak would add block rounding and cuDNN
    workspaces, and differ between a CPU and a GPU run of the same network)."""
    model.eval()
    x = probe_input(model, input_shape, batch)
    mode = _LiveBytes()
    with mode:
        out = model(x)
    del out
    return mode.peak + x.untyped_storage().nbytes()


def summary(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    return {"macs": count_macs(model, input_shape), "params": count_params(model)}
