"""Stream projection (beyond the paper): residual streams found as tied groups in the graph,
exact at keep=1.0, MACs predicted exactly (option-A shortcuts become 1x1 maps), checkpoints
round-trip, and the CaP optimisation runs on them."""

import pytest
import torch

from caproj import metrics, surgery
from caproj.budget import MacModel, predict_macs, widths_for_keep, widths_for_macs
from caproj.config import CapConfig
from caproj.coverage import randomise_bn
from caproj.data import Splits
from caproj.models import build_model, load_model, make_checkpoint
from caproj.sites import find_sites, require_sites

from conftest import make_cap, run_cap

STREAM_ARCHS = [  # (arch, input shape, stream sites, all sites)
    ("resnet20", (3, 32, 32), 3, 12),
    ("tv:resnet18", (3, 64, 64), 4, 12),
    ("tv:resnet50", (3, 64, 64), 4, 36),
    ("tv:mobilenet_v2", (3, 64, 64), 5, 25),  # + 17 expansion sites through depthwise convs
]


def _random_p(sites, widths, seed=0):
    """Random P of each site's kind: a selection through depthwise convs, block-diagonal for
    grouped sites, dense otherwise."""
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s, k in zip(sites, widths, strict=True):
        if s.selection:
            idx = torch.randperm(s.channels, generator=g)[:k].sort().values
            p = torch.zeros(s.channels, k)
            p[idx, torch.arange(k)] = 1.0
        else:
            n = s.groups
            p = torch.block_diag(*[torch.linalg.qr(torch.randn(s.channels // n, k // n,
                                                               generator=g))[0]
                                   for _ in range(n)])
        ps.append(p)
    return ps


def test_cifar_resnet_streams_are_the_three_stages():
    sites = [s for s in find_sites(build_model("resnet20"), stream=True).sites if s.tied]
    assert [s.channels for s in sites] == [16, 32, 64]
    s1, s2, s3 = sites
    assert s1.producers[0] == ("conv1", "bn1")  # the stem
    assert [p for p, _ in s1.producers[1:]] == [f"layer1.{i}.conv2" for i in range(3)]
    assert [c for c, _ in s1.consumers] == [f"layer1.{i}.conv1" for i in range(3)] + \
        ["layer2.0.conv1"]
    assert s1.maps_out == ["layer2.0.shortcut"] and s2.maps_in == ["layer2.0.shortcut"]
    assert s3.consumers[-1] == ("linear", 1)  # the classifier reads the last stream
    # without stream=True the paper's behaviour: block outputs are not sites
    assert not any(s.tied for s in find_sites(build_model("resnet20")).sites)


def test_torchvision_downsample_is_producer_and_consumer():
    sites = [s for s in find_sites(build_model("tv:resnet18"), stream=True).sites if s.tied]
    assert ("layer2.0.downsample.0", 1) in sites[0].consumers
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in sites[1].producers


def test_stream_that_reaches_a_concatenation_is_refused_with_the_reason():
    rep = find_sites(build_model("tv:densenet121"), stream=True)
    assert not any(s.tied for s in rep.sites)
    rep = find_sites(build_model("tv:efficientnet_b0"), stream=True)
    reasons = [v for v in rep.skipped.values() if v.startswith("residual stream")]
    assert reasons and all("not projectable" in v for v in reasons)


@pytest.mark.parametrize("arch, shape, n_stream, n_all", STREAM_ARCHS)
def test_stream_keep_one_is_exact_through_full_cap(arch, shape, n_stream, n_all):
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch))
    sites = require_sites(model, stream=True)
    assert sum(s.tied for s in sites) == n_stream and len(sites) == n_all
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, *shape, generator=g) for _ in range(2)]
    cap = make_cap(model, sites, widths_for_keep(sites, 1.0), CapConfig(steps=5, log_every=0),
                   shape)
    cap.calibrate(calib)
    cap.refit()
    out = cap.finalize()
    x = torch.randn(2, *shape, generator=g)
    with torch.no_grad():
        ref = model(x)
        assert (out(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("arch, shape, n_stream, n_all", STREAM_ARCHS)
def test_stream_macs_after_surgery_equal_prediction(arch, shape, n_stream, n_all):
    model = randomise_bn(build_model(arch))
    sites = require_sites(model, stream=True)
    mm = MacModel.of(model, shape)
    widths = widths_for_macs(mm, sites, 0.3, 8)
    small = surgery.apply(model, sites, _random_p(sites, widths),
                          calib=[torch.randn(4, *shape)])
    assert metrics.count_macs(small, shape) == predict_macs(mm, sites, widths)
    assert 0.297 <= predict_macs(mm, sites, widths) / mm.total <= 0.3
    # block outputs really are narrower now
    assert all(s.channels > k for s, k in zip(sites, widths, strict=True))


def test_projected_option_a_shortcut_and_checkpoint_round_trip(tmp_path):
    model = randomise_bn(build_model("resnet20"))
    sites = require_sites(model, stream=True)
    widths = widths_for_keep(sites, 0.5)
    small = surgery.apply(model, sites, _random_p(sites, widths),
                          calib=[torch.randn(4, 3, 32, 32)])
    w = small.layer2[0].shortcut.weight
    assert w.shape == (16, 8, 1, 1)  # P_out^T E P_in: the zero padding, projected
    torch.save(make_checkpoint(small, "resnet20", compressed=True), tmp_path / "s.pt")
    loaded, _ = load_model(tmp_path / "s.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_cap_optimisation_runs_on_streams_and_reduces_reconstruction():
    torch.manual_seed(0)
    model = randomise_bn(build_model("resnet20", num_classes=3))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    splits = Splits("rand", x, y, x[:32], y[:32], ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3)
    sites = require_sites(model, stream=True)
    cfg = CapConfig(init="pca", relax="projection", refit=False, kd=1.0, steps=30, lr=5e-3,
                    batch_size=32, calib_images=64, log_every=0, bf16=False)
    cap, out = run_cap(model, sites, widths_for_keep(sites, 0.5), cfg, splits)
    rec = [h["recon"] for h in cap.history]
    assert len(rec) == 30 and sum(rec[-5:]) < 0.9 * sum(rec[:5])
    assert cap.max_orthonormality_error() <= 1e-5
    assert out.layer1[0].conv1.in_channels == 8 and out.linear.in_features == 32


def test_bench_runs_the_beyond_the_paper_variants(tmp_path):
    import json

    from conftest import caproj, make_image_folder

    data = make_image_folder(tmp_path / "imgs", per_class=8, size=16)
    torch.save(randomise_bn(build_model("resnet20", num_classes=3)).state_dict(),
               tmp_path / "r20.th")
    out = tmp_path / "bench"
    r = caproj("bench", "--arch", "resnet20", "--weights", tmp_path / "r20.th", "--data", data,
               "--methods", "cap,cap:stream-projection,cap:stream-projection:allocation=auto,"
               "cap:match-scale", "--targets",
               "0.4",
               "--cap-steps", "2", "--finetune-epochs", "0", "--no-latency", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    cells = {m: json.loads((out / f"{m}-0.4.json").read_text())
             for m in ("cap", "cap+stream-projection", "cap+stream-projection+allocation=auto",
                       "cap+match-scale")}
    cells["cap+stream"] = cells.pop("cap+stream-projection")
    cells["cap+stream+auto"] = cells.pop("cap+stream-projection+allocation=auto")
    cells["cap+rescale"] = cells.pop("cap+match-scale")
    assert len(cells["cap"]["widths"]) == 9 and len(cells["cap+stream"]["widths"]) == 12
    for c in cells.values():
        assert 0.99 * 0.4 <= c["macs"] / c["macs_original"] <= 0.4
    assert cells["cap+stream"]["widths"] != cells["cap+stream+auto"]["widths"]
    # +rescale: the same network function at the original layers' weight sizes
    assert cells["cap+rescale"]["widths"] == cells["cap"]["widths"]
    assert cells["cap+rescale"]["match_scale"] and "match_scale" not in cells["cap"]
    assert cells["cap+rescale"]["acc_before_finetune"] == cells["cap"]["acc_before_finetune"]


def test_info_lists_sites_and_streams():
    from conftest import caproj

    r = caproj("info", "--arch", "resnet20", "--sites", "--stream-projection")
    assert r.returncode == 0, r.stderr
    assert "12 sites:" in r.stdout and "maps out: layer2.0.shortcut" in r.stdout
    r = caproj("info", "--arch", "resnet20", "--sites")
    assert "9 sites:" in r.stdout and "layer1.0.conv2:" in r.stdout  # why it is not a site


def test_refit_covers_every_stream_consumer_and_lowers_their_error():
    torch.manual_seed(0)
    model = randomise_bn(build_model("resnet20", num_classes=3)).eval()
    sites = require_sites(model, stream=True)
    # streams halved, internal sites whole: every stream consumer's output stays comparable
    widths = [s.channels // 2 if s.tied else s.channels for s in sites]
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(2)]
    streams = [s for s in sites if s.tied]
    names = [c for s in streams for c, _ in s.consumers]
    assert len(names) >= 10  # next blocks' conv1, option-A maps excluded, the classifier

    def errors(cap):
        out = {}
        mods = dict(cap.narrow.named_modules())
        omods = dict(model.named_modules())
        for n in names:
            got = {}
            h1 = mods[n].register_forward_hook(lambda m, i, o, got=got: got.__setitem__("n", o))
            h2 = omods[n].register_forward_hook(lambda m, i, o, got=got: got.__setitem__("o", o))
            with torch.no_grad():
                cap.forward_narrow(calib[0], cap.tensors())
                model(calib[0])
            h1.remove(), h2.remove()
            out[n] = float((got["n"] - got["o"]).pow(2).sum() / got["o"].pow(2).sum())
        return out

    cfg = CapConfig(init="select", steps=0, calib_images=128, log_every=0, bf16=False)
    plain = make_cap(model, sites, widths, cfg.replace(refit=False), (3, 32, 32))
    plain.calibrate(calib)
    refit = make_cap(model, sites, widths, cfg, (3, 32, 32))
    refit.calibrate(calib)  # statistics, init and the cascaded refit
    assert set(names) <= set(refit.consumer_w)  # every consumer of every stream is refitted
    before, after = errors(plain), errors(refit)
    assert sum(after.values()) < 0.8 * sum(before.values())
    from caproj.refit import Walk

    first = Walk(model).call_order(set(names))[0]
    assert after[first] <= before[first] + 1e-6  # least squares on the same prefix


def test_stream_compression_lowers_the_default_learning_rates():
    model = build_model("resnet20", num_classes=3).eval()
    sites = require_sites(model, stream=True)
    whole_streams = [s.channels if s.tied else s.channels // 2 for s in sites]
    half_streams = [s.channels // 2 if s.tied else s.channels for s in sites]
    shape = (3, 32, 32)
    internal = make_cap(model, sites, whole_streams, CapConfig(), shape)
    stream = make_cap(model, sites, half_streams, CapConfig(), shape)
    chosen = make_cap(model, sites, half_streams, CapConfig(lr=5e-4, weight_lr=2e-4), shape)
    assert (internal.cfg.lr, internal.cfg.weight_lr) == (1e-3, 3e-4)
    assert (stream.cfg.lr, stream.cfg.weight_lr) == (2e-4, 1e-4)
    assert (chosen.cfg.lr, chosen.cfg.weight_lr) == (5e-4, 2e-4)
    assert stream.cfg.lr == 2e-4  # the rate used is what the report records
