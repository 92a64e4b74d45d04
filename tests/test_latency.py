"""Latency budgets: the per-layer latency model (cached, interpolated), the allocator's
predicted latency against the target, target_latency=1.0 changing nothing, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import caproj
from caproj import latency as L
from caproj.errors import CaprojError
from caproj.models import build_model
from caproj.plan import Plan
from caproj.sites import require_sites
from caproj.utils import steady_allocator

from conftest import caproj as caproj_cli

SHAPE = (3, 32, 32)
SPEC = L.Spec("eager", 1, 1)


@pytest.fixture(autouse=True)
def _fast_layers(monkeypatch):
    monkeypatch.setattr(L, "LAYER_SECONDS", 0.03)  # tests check logic, benchmarks time


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20").eval()


def _data(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=32)


def test_table_is_cached_and_reused(tmp_path):
    m = _model()
    sites = require_sites(m)
    first = L.LatencyModel.build(m, sites, SHAPE, SPEC, cache=tmp_path)
    assert first.measured_layers > 0
    files = list(tmp_path.glob("eager-b1-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["ident"]["runtime"] == "eager" and stored["ident"]["threads"] == 1
    assert stored["ident"]["allocator"] == ("steady" if steady_allocator() else "system")
    # every layer time, and the network's calibration (the original's time, the floor's ratio)
    assert len(stored["times"]) == first.measured_layers + 2
    second = L.LatencyModel.build(m, sites, SHAPE, SPEC, cache=tmp_path)
    assert second.measured_layers == 0  # every layer time came from the cache
    w = [max(1, s.channels // 2) for s in sites]
    assert second.layer_ms(w) == pytest.approx(first.layer_ms(w))
    # a warm cache gives the same model, so the same widths for the same job
    assert (second.full_ms, second.scale) == (first.full_ms, first.scale)
    assert second.predict(w) == first.predict(w)
    # another batch size is another table
    other = L.LatencyModel.build(m, sites, SHAPE, L.Spec("eager", 2, 1), cache=tmp_path)
    assert other.measured_layers > 0 and len(list(tmp_path.glob("*.json"))) == 2


def test_steady_allocator_reuses_freed_tensor_memory():
    """Latency is measured with freed CPU tensor memory kept for reuse: a 40 MB tensor (above
    glibc's largest automatic mmap threshold, 32 MB) allocated and freed ten times faults its
    pages in once, not ten times."""
    import platform
    import resource

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("steady_allocator tunes glibc's malloc; this C library is another")
    assert steady_allocator() and steady_allocator()  # applied, and idempotent
    pages = (40 << 20) // resource.getpagesize()
    torch.empty(10 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(10 << 20).fill_(1.0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2 * pages


def test_inductor_layer_table_compiles_each_width_once(tmp_path):
    """Each standalone copy compiles once, for the channels_last input it is timed with: a
    second compilation per copy used to exhaust dynamo's room for the copies of one layer, and
    the last widths then ran uncompiled (timed in eager)."""
    from torch._dynamo.utils import counters

    table = L.Table(L.Spec("inductor", 2, 1), tmp_path)
    layer = L.Layer("conv", 8, 8, (8, 4, 4), (3, 3), (1, 1), (1, 1), (1, 1))
    before = counters["stats"]["unique_graphs"]
    times = table.get_many(layer, [(8, 2), (8, 4), (8, 6)])
    assert counters["stats"]["unique_graphs"] - before == 3 and all(t > 0 for t in times)


def test_layers_and_interpolation():
    m = _model()
    sites = require_sites(m)
    entries = L.site_layers(m, sites, SHAPE, multiple=8)
    producers = {s.producer for s in sites}
    consumers = {s.consumer for s in sites}
    assert {e.name for e in entries} == producers | consumers
    e = next(e for e in entries if e.name in producers and e.layer.c_out == 64)
    assert e.side_in is None and e.side_out.grid == [8, 16, 24, 32, 40, 48, 56, 64]
    e.times = {(-1, k): float(k) ** 1.5 for k in e.side_out.grid}
    assert e.time(-1, 16) == pytest.approx(16 ** 1.5)  # grid points are exact
    assert e.time(-1, 20) == pytest.approx((16 ** 1.5 + 24 ** 1.5) / 2)  # linear between
    # a depthwise layer follows the width on both sides, groups included
    dw = L.Layer("conv", 32, 32, (32, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 32, True, False)
    assert L.site_grid(960, 8) == (64, list(range(64, 961, 64)))  # power-of-two spacing
    assert L.site_grid(100, 8)[1][-1] == 100  # the full width is always measured
    mod, shape = dw.module(8, 8)
    assert mod[0].groups == 8 and shape == (8, 8, 8)
    assert mod(torch.zeros(1, *shape)).shape == (1, 8, 8, 8)


@pytest.mark.parametrize("target", [0.8, 0.9])  # eager at batch 1: overhead-bound
def test_allocator_lands_on_the_predicted_target(tmp_path, target):
    m = _model()
    plan = Plan.of(m, SHAPE, target_latency=target, latency_spec=SPEC, latency_cache=tmp_path)
    lm = plan.latency
    assert lm is not None and plan.widths is not None
    first = plan.latency_checks[0]
    assert abs(first["predicted"] - target) <= 0.05 * target  # the solver's own target
    assert first["predicted"] == pytest.approx(lm.predict(first["widths"]) / lm.full_ms)
    sites = require_sites(m)
    assert all(k % st == 0 or k == s.channels  # on the measured grid
               for k, st, s in zip(plan.widths, lm.steps, sites, strict=True))
    # widths change only when the measurement misses; then the goal is tighter
    for a, b in zip(plan.latency_checks, plan.latency_checks[1:], strict=False):
        assert a["measured"] > target * 0.99 and b["goal"] < a["goal"]
    assert plan.describe()["latency_model"]["runtime"] == "eager"


def test_auto_allocation_by_latency(tmp_path):
    m = _model()
    calib = [x for x, _ in _data()]
    plan = Plan.of(m, SHAPE, target_latency=0.8, allocation="auto", latency_spec=SPEC,
                   latency_cache=tmp_path)
    assert plan.widths is None  # the profiles need calibration data
    widths = plan.resolve(m, calib)
    first = plan.latency_checks[0]
    assert abs(first["predicted"] - 0.8) <= 0.05 * 0.8
    assert widths == plan.latency_checks[-1]["widths"]


def test_target_latency_one_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPROJ_CACHE", str(tmp_path))
    m = _model()
    x = torch.randn(4, *SHAPE)
    res = caproj.compress(m, _data(), target_latency=1.0, steps=0, progress=False)
    assert res.report["preset"]["name"] == "latency"  # its stream sites are kept whole too
    assert res.widths == [s.channels for s in res.sites]
    assert len(res.sites) >= len(require_sites(m))
    assert res.report["macs_after"] == res.report["macs_before"]
    assert "latency" not in res.report  # nothing to measure: nothing was narrowed
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), m(x), rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.rglob("*.json"))  # and no table was measured


def test_compress_to_a_latency_reports_measured_and_predicted(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPROJ_CACHE", str(tmp_path))
    res = caproj.compress(_model(), _data(), target_latency=0.8, steps=2, progress=False,
                          runtime="eager", latency_batch=1, latency_threads=1)
    lat = res.report["latency"]
    assert lat["runtime"] == "eager" and lat["batch"] == 1 and lat["threads"] == 1
    assert len(lat["speedups"]) == 3 and lat["speedup"] > 1.0
    assert lat["original_ms"] > lat["compressed_ms"] > 0
    assert res.report["target_latency"] == 0.8
    assert res.report["latency_model"]["original_ms"] > 0
    assert res.report["macs_after"] < res.report["macs_before"]


@pytest.mark.parametrize("kwargs, param", [
    ({"target_latency": 1.5}, "target_latency"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "target_latency"),
    ({"target_latency": 0.5, "runtime": "tensorrt"}, "runtime"),
    ({"target_latency": 0.5, "latency_batch": 0}, "latency_batch"),
])
def test_bad_latency_input(kwargs, param):
    with pytest.raises(CaprojError) as e:
        caproj.compress(_model(), _data(), steps=0, progress=False, **kwargs)
    assert e.value.param == param


def test_cli_target_latency_flags(tmp_path):
    run = caproj_cli("compress", "--arch", "resnet20", "--weights", "x.th", "--data", "digits",
                     "--out", tmp_path / "o", "--target-latency", "0.5", "--target-macs", "0.5")
    assert run.returncode == 2
    assert run.stderr.startswith("caproj: error:") and "--target-latency" in run.stderr
    run = caproj_cli("compress", "--help")
    for flag in ("--target-latency", "--runtime", "--latency-batch", "--latency-threads"):
        assert flag in run.stdout


def test_unreachable_latency_points_to_stream_projection(tmp_path):
    m = _model()
    with pytest.raises(CaprojError) as e:
        Plan.of(m, SHAPE, target_latency=0.01, latency_spec=SPEC, latency_cache=tmp_path)
    msg = str(e.value)
    assert "target_latency 0.01 is unreachable" in msg and e.value.param == "target_latency"
    assert msg.endswith("stream_projection=True narrows the residual streams too")
    from caproj.cli import build_parser, command_parser, flags_of, translate
    flags = flags_of(command_parser(build_parser(), "compress"))
    assert "--stream-projection narrows" in translate(e.value, flags)
    with pytest.raises(CaprojError) as e:  # with the streams projected: no such hint
        Plan.of(m, SHAPE, target_latency=0.01, latency_spec=SPEC, latency_cache=tmp_path,
                stream_projection=True)
    assert "stream_projection" not in str(e.value)


def test_a_latency_check_within_its_noise_keeps_the_widths(tmp_path, monkeypatch):
    """The same job gives the same network: a live check that misses the target by less than
    the measurement's own noise does not re-solve; a miss beyond it does (stubbed timer)."""
    import caproj.plan as P

    m = _model()
    Plan.of(m, SHAPE, target_latency=0.8, latency_spec=SPEC, latency_cache=tmp_path)  # table

    real = P.L.compare

    def timer(miss: float, noise: float):
        def compare(models, shape, spec, repeats=3, rounds=None):
            if set(models) != {"original", "compressed"}:
                return real(models, shape, spec, repeats, rounds)
            ratio = 0.8 * (1 + miss)  # the measurement: the target missed by `miss`
            return {"original": {"median_ms": 1.0, "speedup": 1.0, "ratio_noise": 0.0},
                    "compressed": {"median_ms": ratio, "speedup": 1 / ratio,
                                   "ratio_noise": noise * 0.8}}
        return compare

    widths = []
    for miss in (0.06, -0.03):  # two draws of the same noise band (+-10 %)
        monkeypatch.setattr(P.L, "compare", timer(miss, 0.10))
        plan = Plan.of(m, SHAPE, target_latency=0.8, latency_spec=SPEC, latency_cache=tmp_path)
        assert len(plan.latency_checks) == 1  # accepted: within the noise
        widths.append(plan.widths)
    assert widths[0] == widths[1]
    monkeypatch.setattr(P.L, "compare", timer(0.30, 0.05))  # a real miss: tighten and re-solve
    plan = Plan.of(m, SHAPE, target_latency=0.8, latency_spec=SPEC, latency_cache=tmp_path)
    assert len(plan.latency_checks) > 1 and plan.latency_checks[1]["goal"] < \
        plan.latency_checks[0]["goal"]
