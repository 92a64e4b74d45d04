"""Sites, projections, surgery and the CaP optimisation."""


import pytest
import torch
from torch import nn

from caproj import metrics, projection, surgery
from caproj.budget import MacModel, predict_macs, widths_for_keep, widths_for_macs
from caproj.config import CapConfig
from caproj.coverage import randomise_bn
from caproj.data import load_data
from caproj.errors import CaprojError
from caproj.models import build_model, load_model
from caproj.sites import find_sites, require_sites

from conftest import MODELS, loaders, make_cap, needs_models, run_cap

ARCHS = [  # (arch, input shape, sites expected)
    ("resnet20", (3, 32, 32), 9),
    ("resnet56", (3, 32, 32), 27),
    ("vgg16_bn", (3, 32, 32), 13),
    ("digits-cnn", (1, 8, 8), 3),
    ("tv:resnet18", (3, 64, 64), 8),
    ("tv:resnet50", (3, 64, 64), 32),
    ("tv:vgg16_bn", (3, 32, 32), 15),
]




def batches(shape, n=2, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, *shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch, shape, n_sites", ARCHS)
def test_sites_found_from_graph(arch, shape, n_sites):
    rep = find_sites(build_model(arch))
    assert len(rep.sites) == n_sites
    if arch.startswith("resnet"):  # block outputs feed the residual addition: never sites
        assert all(s.producer.endswith("conv1") and s.consumer.endswith("conv2")
                   for s in rep.sites)
        assert "residual" in rep.skipped["layer1.0.conv2"]


@pytest.mark.parametrize("arch, shape, n_sites", ARCHS)
def test_keep_one_is_exact_through_full_cap(arch, shape, n_sites):
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch))
    sites = require_sites(model)
    calib = batches(shape)
    cap = make_cap(model, sites, widths_for_keep(sites, 1.0), CapConfig(steps=5, log_every=0),
                   shape)
    cap.calibrate(calib)
    cap.refit()
    out = cap.finalize()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref = model(x)
        # untrained nets with random BN reach logits of 1e5; compare at the logits' own scale
        # (the absolute 1e-4 check runs on the real ResNet-56 checkpoint below)
        assert (out(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@needs_models
def test_keep_one_is_exact_on_real_resnet56(cifar):
    model, _ = load_model(MODELS / "resnet56-cifar10jpeg.th", "resnet56")
    sites = require_sites(model)
    _, out = run_cap(model, sites, widths_for_keep(sites, 1.0),
                     CapConfig(steps=5, log_every=0, calib_images=200), cifar)
    x = next(iter(loaders(cifar, calib_images=64, seed=1)[1]))[0]
    with torch.no_grad():
        assert (out(x) - model(x)).abs().max().item() <= 1e-4


def test_selection_surgery_equals_masking_channels():
    """At keep < 1 a selection P must give exactly the network with the other channels zeroed."""
    torch.manual_seed(0)
    model = randomise_bn(build_model("vgg16_bn"))
    sites = require_sites(model)
    ps = []
    for s in sites:
        idx = torch.randperm(s.channels)[: s.channels // 2]
        ps.append(projection.init_select(torch.zeros(s.channels).index_fill(0, idx, 1.0),
                                         s.channels // 2))
    small = surgery.apply(model, sites, ps, calib=batches((3, 32, 32)))
    mods = dict(model.named_modules())
    hooks = []
    for s, p in zip(sites, ps, strict=True):
        mask = p.sum(1).view(1, -1, 1, 1)
        hooks.append(mods[s.bn].register_forward_hook(lambda m, i, o, mask=mask: o * mask))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= 1e-4
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("arch, shape", [("resnet56", (3, 32, 32)), ("vgg16_bn", (3, 32, 32)),
                                         ("tv:resnet50", (3, 64, 64))])
@pytest.mark.parametrize("target", [0.5, 0.25])
def test_target_macs_met_and_surgery_matches_prediction(arch, shape, target):
    model = build_model(arch).eval()
    sites = require_sites(model)
    mm = MacModel.of(model, shape)
    widths = widths_for_macs(mm, sites, target)
    pred = predict_macs(mm, sites, widths)
    assert abs(pred / mm.total - target) <= 0.01 * target
    ps = [torch.eye(s.channels)[:, :k] for s, k in zip(sites, widths, strict=True)]
    small = surgery.apply(model, sites, ps)
    assert metrics.count_macs(small, shape) == pred


def test_unreachable_target_and_bad_keep():
    model = build_model("resnet20")
    sites = require_sites(model)
    with pytest.raises(CaprojError, match="unreachable"):
        widths_for_macs(MacModel.of(model, (3, 32, 32)), sites, 0.02)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(CaprojError, match="keep must be a number in"):
            widths_for_keep(sites, bad)


def test_model_without_sites_is_refused_naming_the_layer():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + y

    with pytest.raises(CaprojError,
                       match="no compressible site in Res: .*residual.*, e.g. a .*2 readers"):
        require_sites(Res())

    class Data(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaprojError, match="cannot trace Data with torch.fx"):
        require_sites(Data())


def test_retraction_is_orthonormal_and_sign_fixed():
    a = torch.randn(32, 12)
    q = projection.retract(a)
    assert projection.orthonormality_error(q) <= 1e-5
    assert torch.allclose(projection.retract(q * 3.0), q, atol=1e-5)  # fixed point
    sel = torch.eye(8)[:, [1, 4, 6]]
    assert torch.equal(projection.retract(sel), sel)  # a selection is its own retraction


def test_pca_init_spans_the_top_eigenvectors():
    st = projection.SiteStats(4, torch.device("cpu"))
    z = torch.randn(1000, 4, 1, 1) * torch.tensor([5.0, 0.1, 3.0, 0.2]).view(1, 4, 1, 1)
    st.add_response(z)
    p = projection.init_pca(st, 2)
    assert torch.allclose(p.abs().sum(1), torch.tensor([1.0, 0.0, 1.0, 0.0]), atol=0.05)


def test_selection_scores_rank_energy_times_weight():
    from caproj.sites import Site

    site = Site("p", "c", channels=3)
    st = projection.SiteStats(3, torch.device("cpu"))
    st.add_consumer_input(torch.tensor([[1.0, 2.0, 3.0]]).view(1, 3, 1, 1), 3)
    w = torch.zeros(2, 3, 1, 1)
    w[:, 0], w[:, 1], w[:, 2] = 10.0, 1.0, 0.1  # channel 0 weakest input, strongest weights
    s = projection.selection_scores(st, {"c.weight": w}, site)
    assert s.argsort().tolist() == [2, 1, 0]  # 0.09*?  -> 0: 1*200, 1: 4*2, 2: 9*0.02


@pytest.fixture(scope="module")
def digits_model():
    from caproj.config import TrainConfig
    from caproj.train import fit

    torch.manual_seed(0)
    data = load_data("digits")
    model = build_model("digits-cnn")
    fit(model, loaders(data, 64)[0], TrainConfig(epochs=4, lr=0.05, batch_size=64))
    return model.eval(), data


def test_reconstruction_falls_and_p_stays_orthonormal(digits_model):
    model, data = digits_model
    sites = require_sites(model)
    cfg = CapConfig(init="pca", relax="projection", refit=False, steps=40, lr=5e-3, kd=0.0,
                    batch_size=64, calib_images=256, log_every=0, bf16=False)
    cap, out = run_cap(model, sites, widths_for_keep(sites, 0.25), cfg, data)
    rec = [h["recon"] for h in cap.history]
    assert sum(rec[-5:]) / 5 < 0.9 * sum(rec[:5]) / 5
    assert cap.max_orthonormality_error() <= 1e-5
    assert out(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert all(p.requires_grad for p in model.parameters())  # the user's model is untouched


def test_refit_beats_plain_projection(digits_model):
    model, data = digits_model
    from caproj.train import evaluate

    sites = require_sites(model)
    accs = {}
    for refit in (False, True):
        cfg = CapConfig(init="pca", refit=refit, steps=0, calib_images=512, log_every=0)
        _, small = run_cap(model, sites, widths_for_keep(sites, 0.25), cfg, data)
        accs[refit] = evaluate(small, loaders(data)[2])["acc"]
    assert accs[True] > accs[False]


def test_same_seed_same_weights(digits_model):
    model, data = digits_model
    sites = require_sites(model)
    cfg = CapConfig(steps=8, batch_size=32, calib_images=128, log_every=0, seed=3)
    a = run_cap(model, sites, widths_for_keep(sites, 0.5), cfg, data)[1].state_dict()
    b = run_cap(model, sites, widths_for_keep(sites, 0.5), cfg, data)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reorthonormalise_replaces_drifted_proxies_keeping_p(digits_model, monkeypatch):
    from caproj import projection

    model, data = digits_model
    sites = require_sites(model)
    cfg = CapConfig(steps=0, calib_images=128, log_every=0, bf16=False)
    cap, _ = run_cap(model, sites, widths_for_keep(sites, 0.5), cfg, data)
    with torch.no_grad():  # a proxy far from orthonormal (what long float32 runs could drift to)
        cap.proxies[0].mul_(torch.linspace(1, 1e3, cap.proxies[0].shape[1]))
    before = [p.clone() for p in cap.projections()]
    assert cap.reorthonormalise() == 0  # QR of a well-posed proxy is orthonormal: nothing to do
    real = projection.retract

    def drifting(a):  # simulate float32 drift of the retraction
        q = real(a)
        return q * 1.001 if a.dtype == torch.float32 else q

    monkeypatch.setattr(projection, "retract", drifting)
    n = cap.reorthonormalise()
    monkeypatch.setattr(projection, "retract", real)
    assert n == sum(a.shape[0] != a.shape[1] for a in cap.proxies) > 0
    for a, p in zip(cap.proxies, before, strict=True):
        assert projection.orthonormality_error(a) <= 1e-5  # the proxy is now P itself
        torch.testing.assert_close(real(a), p, atol=1e-5, rtol=0)


def test_refit_toward_the_projected_weights(digits_model):
    """ridge_to="projected": min ||X W' - Y||^2 + lambda ||W' - W P||^2. A huge ridge gives W P
    itself (zero: the zero matrix); a moderate one lands between W P and the plain refit."""
    model, data = digits_model
    sites = require_sites(model)
    widths = widths_for_keep(sites, 0.25)
    _, calib, _ = loaders(data, 64, 256)
    got = {}
    for ridge_to, ridge in (("zero", 1e-4), ("projected", 1e8), ("zero", 1e8),
                            ("projected", 0.3)):
        cfg = CapConfig(steps=0, calib_images=256, log_every=0, ridge=ridge, ridge_to=ridge_to)
        cap = make_cap(model, sites, widths, cfg, data.input_shape)
        cap.calibrate(calib)
        got[ridge_to, ridge] = cap
    plain = got["zero", 1e-4]
    ps = plain.projections()
    for name, w in plain.consumer_w.items():
        i, spatial = next((i, sp) for i, s in enumerate(sites) for c, sp in s.consumers
                          if c == name)
        wp = surgery.project_in(dict(model.named_parameters())[f"{name}.weight"].detach(),
                                ps[i], sites[i], spatial)
        assert torch.allclose(got["projected", 1e8].consumer_w[name], wp, atol=1e-5)
        assert got["zero", 1e8].consumer_w[name].abs().max() < 1e-3 * wp.abs().max()
        mid = got["projected", 0.3].consumer_w[name]
        assert (mid - wp).norm() < (w - wp).norm()  # pulled toward W P, not all the way
        assert (mid - wp).norm() > 1e-3 * wp.norm()
    with pytest.raises(CaprojError, match="ridge_to"):
        CapConfig(ridge_to="one")
