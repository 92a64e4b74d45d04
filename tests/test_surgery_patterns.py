"""Surgery for every layer pattern a site accepts, narrowed to half width and compared with the
same layers narrowed by hand (plain slicing / block products written out here, not through
caproj), plus the patterns that are refused with a one-line reason."""

import pytest
import torch
from torch import nn

from caproj import surgery
from caproj.budget import MacModel, predict_macs
from caproj.coverage import randomise_bn
from caproj.metrics import count_macs
from caproj.sites import find_sites, require_sites

torch.manual_seed(0)


def _sel(c: int, idx: list[int]) -> torch.Tensor:
    p = torch.zeros(c, len(idx))
    p[idx, torch.arange(len(idx))] = 1.0
    return p


def _bn_fold(conv_w, conv_b, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = conv_b if conv_b is not None else torch.zeros_like(scale)
    return conv_w * scale.view(-1, *([1] * (conv_w.dim() - 1))), \
        (b - bn.running_mean) * scale + bn.bias


def _check(model, p_of_site, hand, x, expect_sites=1):
    model = randomise_bn(model).eval()
    sites = require_sites(model)
    assert len(sites) == expect_sites, [str(s) for s in sites]
    ps = [p_of_site(s) for s in sites]
    narrow = surgery.apply(model, sites, ps)
    with torch.no_grad():
        got, want = narrow(x), hand(model, x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    # the MACs model predicts the narrowed network's real count
    mm = MacModel.of(model, tuple(x.shape[1:]))
    assert predict_macs(mm, sites, [p.shape[1] for p in ps]) == \
        count_macs(narrow, tuple(x.shape[1:]))
    return sites, narrow


class ConvBiasBN(nn.Module):
    """A conv with its own bias *and* a BN (torchvision's VGG-BN has none, timm's some do)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), \
            nn.Conv2d(16, 5, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def test_conv_with_own_bias_and_bn():
    idx = [0, 3, 4, 7, 9, 10, 12, 15]

    def hand(m, x):
        w, b = _bn_fold(m.a.weight, m.a.bias, m.bn)
        h = torch.relu(nn.functional.conv2d(x, w[idx], b[idx], padding=1))
        return nn.functional.conv2d(h, m.b.weight[:, idx], m.b.bias, padding=1)

    _, narrow = _check(ConvBiasBN(), lambda s: _sel(16, idx), hand, torch.randn(2, 3, 8, 8))
    assert narrow.a.weight.shape == (8, 3, 3, 3) and narrow.bn.num_features == 8


class PooledHead(nn.Module):
    """VGG/AlexNet classifier: adaptive pooling to 3x3, flatten, Linear reading c x 9."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(3), nn.Linear(8 * 9, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def test_linear_after_adaptive_pool_to_3x3():
    g = torch.Generator().manual_seed(1)
    p = torch.linalg.qr(torch.randn(8, 4, generator=g))[0]  # a dense projection

    def hand(m, x):
        w, b = _bn_fold(m.conv.weight, m.conv.bias, m.bn)
        z = nn.functional.conv2d(x, torch.einsum("cd,cikl->dikl", p, w), p.T @ b, padding=1)
        h = m.pool(torch.relu(z))  # N x 4 x 3 x 3
        wf = m.fc.weight.reshape(4, 8, 9)  # out x channel x spatial slot
        wn = torch.einsum("ocs,cd->ods", wf, p).reshape(4, -1)
        return torch.flatten(h, 1) @ wn.T + m.fc.bias

    sites, _ = _check(PooledHead(), lambda s: p, hand, torch.randn(2, 3, 9, 9))
    assert sites[0].spatial == 9


class Grouped(nn.Module):
    """ResNeXt's bottleneck: 1x1 -> BN -> ReLU -> grouped 3x3 -> BN -> ReLU -> 1x1."""

    def __init__(self, g=4, c=16):
        super().__init__()
        self.a, self.bna = nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c)
        self.b, self.bnb = nn.Conv2d(c, c, 3, padding=1, groups=g, bias=False), \
            nn.BatchNorm2d(c)
        self.c = nn.Conv2d(c, 6, 1)

    def forward(self, x):
        h = torch.relu(self.bna(self.a(x)))
        return self.c(torch.relu(self.bnb(self.b(h))))


def _block_diag_p(c, k, g, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.block_diag(*[torch.linalg.qr(torch.randn(c // g, k // g, generator=gen))[0]
                              for _ in range(g)])


def test_grouped_conv_keeps_equal_groups_with_block_diagonal_projections():
    ps = {"a": _block_diag_p(16, 8, 4, 2), "b": _block_diag_p(16, 8, 4, 3)}

    def hand(m, x):
        pa, pb = ps["a"], ps["b"]
        wa, ba = _bn_fold(m.a.weight, None, m.bna)
        h = torch.relu(nn.functional.conv2d(x, torch.einsum("cd,cikl->dikl", pa, wa),
                                            pa.T @ ba))
        wb, bb = _bn_fold(m.b.weight, None, m.bnb)  # 16 x 4 x 3 x 3, group j reads 4j..4j+3
        out = []
        for j in range(4):  # each group by hand: output block pb_j^T, input block pa_j
            a_j = pa[4 * j:4 * j + 4, 2 * j:2 * j + 2]
            b_j = pb[4 * j:4 * j + 4, 2 * j:2 * j + 2]
            w_j = torch.einsum("oikl,id->odkl", wb[4 * j:4 * j + 4], a_j)
            w_j = torch.einsum("od,oikl->dikl", b_j, w_j)
            out.append(nn.functional.conv2d(h[:, 2 * j:2 * j + 2], w_j, b_j.T @ bb[4 * j:4 * j + 4],
                                            padding=1))
        z = torch.relu(torch.cat(out, 1))
        return nn.functional.conv2d(z, torch.einsum("oikl,id->odkl", m.c.weight, pb), m.c.bias)

    sites, narrow = _check(Grouped(), lambda s: ps[s.producer], hand, torch.randn(2, 3, 6, 6),
                           expect_sites=2)
    assert [s.groups for s in sites] == [4, 4]
    assert narrow.b.groups == 4 and narrow.b.weight.shape == (8, 2, 3, 3)


def test_grouped_widths_stay_multiples_of_the_groups():
    from caproj.budget import widths_for_keep, widths_for_macs

    m = randomise_bn(Grouped(g=4, c=128)).eval()
    sites = require_sites(m)
    mm = MacModel.of(m, (3, 16, 16))
    for t in (0.4, 0.5):
        widths = widths_for_macs(mm, sites, t, multiple=1)
        assert all(k % 4 == 0 for k in widths) and min(widths) < 128
        assert abs(predict_macs(mm, sites, widths) / mm.total - t) <= 0.01 * t
    assert all(k % 4 == 0 for k in widths_for_keep(sites, 0.4, multiple=1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(4, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.dw, self.bn2 = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), \
            nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 4, 1, bias=False)

    def forward(self, x):
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        return self.project(nn.functional.relu6(self.bn2(self.dw(h))))


def test_depthwise_inside_a_site_is_a_selection():
    idx = [1, 2, 5, 6, 8, 11]
    m = InvertedResidual()
    rep = find_sites(randomise_bn(m))
    assert rep.sites[0].selection and rep.sites[0].mids == ["dw", "bn2"]
    assert "depthwise" in rep.skipped["dw"]

    def hand(m, x):
        w, b = _bn_fold(m.expand.weight, None, m.bn1)
        h = nn.functional.relu6(nn.functional.conv2d(x, w[idx], b[idx]))
        z = nn.functional.conv2d(h, m.dw.weight[idx], padding=1, groups=len(idx))
        bn = m.bn2
        z = (z - bn.running_mean[idx, None, None]) / torch.sqrt(
            bn.running_var[idx, None, None] + bn.eps) * bn.weight[idx, None, None] + \
            bn.bias[idx, None, None]
        return nn.functional.conv2d(nn.functional.relu6(z), m.project.weight[:, idx])

    _, narrow = _check(m, lambda s: _sel(12, idx), hand, torch.randn(2, 4, 6, 6))
    assert narrow.dw.groups == 6 and narrow.dw.weight.shape == (6, 1, 3, 3)


class SqueezeExcite(nn.Module):
    """EfficientNet's block: expand -> BN -> SiLU -> depthwise -> BN -> SiLU -> SE -> project."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), \
            nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.project = nn.Conv2d(8, 3, 1, bias=False)

    def forward(self, x):
        h = nn.functional.silu(self.bn2(self.dw(nn.functional.silu(self.bn1(self.expand(x))))))
        s = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(self.pool(h)))))
        return self.project(h * s)


def test_squeeze_excitation_gate_is_selected_with_the_channels():
    idx = [0, 2, 3, 7]
    m = SqueezeExcite()
    site = find_sites(randomise_bn(m)).sites[0]
    assert site.gates == [("fc1", "fc2")] and site.selection

    def hand(m, x):
        w, b = _bn_fold(m.expand.weight, None, m.bn1)
        h = nn.functional.silu(nn.functional.conv2d(x, w[idx], b[idx]))
        z = nn.functional.conv2d(h, m.dw.weight[idx], padding=1, groups=len(idx))
        bn = m.bn2
        z = nn.functional.batch_norm(z, bn.running_mean[idx], bn.running_var[idx],
                                     bn.weight[idx], bn.bias[idx], False, 0.0, bn.eps)
        h = nn.functional.silu(z)
        s = nn.functional.conv2d(h.mean((2, 3), keepdim=True), m.fc1.weight[:, idx], m.fc1.bias)
        s = torch.sigmoid(nn.functional.conv2d(nn.functional.silu(s), m.fc2.weight[idx],
                                               m.fc2.bias[idx]))
        return nn.functional.conv2d(h * s, m.project.weight[:, idx])

    # the SE's own bottleneck (fc1 -> fc2) is a second site, kept whole here
    _check(m, lambda s: _sel(8, idx) if s.producer == "expand" else torch.eye(s.channels),
           hand, torch.randn(2, 4, 6, 6), expect_sites=2)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def test_concatenation_is_refused_with_its_reason():
    from caproj.errors import CaprojError

    rep = find_sites(Concat())
    assert not rep.sites and "concatenation" in rep.skipped["a"]
    with pytest.raises(CaprojError, match="concatenation"):
        require_sites(Concat())


class GroupedThenDepthwise(nn.Module):
    """A depthwise conv after a grouped producer: not a pattern caproj narrows (refused)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.c(self.dw(self.a(x)))


def test_grouped_producer_feeding_a_depthwise_conv_is_refused():
    rep = find_sites(GroupedThenDepthwise())
    assert not rep.sites and "follows a grouped producer" in rep.skipped["a"]


class Mixed(nn.Module):
    """A stem, a grouped bottleneck, an inverted residual with SE, and a head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.grouped = Grouped(g=4, c=32)  # 3 -> 32 -> grouped 32 -> 6
        self.lift = nn.Conv2d(6, 4, 1)
        self.se = SqueezeExcite()  # 4 -> 8 -> depthwise -> SE -> 3

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = self.grouped(h[:, :3])
        return self.se(self.lift(h)).mean((2, 3))


@pytest.mark.parametrize("init", ["select", "pca"])
@pytest.mark.parametrize("narrowed", [("grouped.a", "se.expand"), ("grouped.b",)],
                         ids=["grouped-consumer+SE", "grouped-producer"])
def test_refit_lowers_the_consumer_error_on_every_pattern(init, narrowed):
    """Least squares over the calibration images lowers each consumer's error against the
    original output below that of the projected weights W P, per group too (a grouped consumer
    is refitted group by group), whatever P is (selection or block-diagonal)."""
    from caproj.cap import CaP
    from caproj.config import CapConfig
    from caproj.sites import require_sites

    torch.manual_seed(0)
    m = randomise_bn(Mixed()).eval()
    sites = require_sites(m)
    widths = [s.channels // 2 if s.producer in narrowed else s.channels for s in sites]
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(3)]
    errs = {}
    for refit in (False, True):
        cap = CaP(m, torch.zeros(1, 3, 10, 10), sites=sites, widths=widths,
                  config=CapConfig(init=init, refit=refit, steps=0, calib_images=24, seed=0))
        cap.calibrate(calib)
        small = cap.finalize()
        mods_o, mods_n = dict(m.named_modules()), dict(small.named_modules())
        err = {}
        for s in cap.sites:
            if s.producer not in narrowed:
                continue
            got: dict = {}
            hs = [mods_o[s.consumer].register_forward_hook(
                      lambda mod, i, o, got=got: got.__setitem__("o", o)),
                  mods_n[s.consumer].register_forward_hook(
                      lambda mod, i, o, got=got: got.__setitem__("n", o))]
            num = den = 0.0
            with torch.no_grad():
                for x in calib:
                    m(x)
                    small(x)
                    num += (got["n"] - got["o"]).pow(2).sum().item()
                    den += got["o"].pow(2).sum().item()
            for h in hs:
                h.remove()
            err[s.consumer] = num / den
        errs[refit] = err
    assert errs[True].keys() == errs[False].keys() and len(errs[True]) == len(narrowed)
    for name, e in errs[True].items():
        assert e < errs[False][name], (name, errs)


class NonAffineBN(nn.Module):
    """BatchNorms without affine parameters (affine=False): one folded into the producer, one
    after a depthwise conv inside the site (selected with the channels)."""

    def __init__(self, track: bool = True):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16, affine=False, track_running_stats=track)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16, affine=False)
        self.b = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn2(self.dw(torch.relu(self.bn(self.a(x)))))))


def test_batchnorm_without_affine_parameters_folds_as_identity_affine():
    idx = [1, 2, 5, 6, 8, 11, 13, 14]
    f = nn.functional

    def hand(m, x):
        scale = torch.rsqrt(m.bn.running_var + m.bn.eps)
        w, b = m.a.weight * scale.view(-1, 1, 1, 1), -m.bn.running_mean * scale
        h = torch.relu(f.conv2d(x, w[idx], b[idx], padding=1))
        h = f.conv2d(h, m.dw.weight[idx], padding=1, groups=len(idx))
        h = f.batch_norm(h, m.bn2.running_mean[idx], m.bn2.running_var[idx], eps=m.bn2.eps)
        return f.conv2d(torch.relu(h), m.b.weight[:, idx], m.b.bias)

    x = torch.randn(2, 3, 8, 8)
    sites, narrow = _check(NonAffineBN(), lambda s: _sel(16, idx), hand, x)
    assert narrow.bn.num_features == 8 and narrow.bn.affine  # holds the folded bias
    assert narrow.bn2.num_features == 8 and not narrow.bn2.affine
    # pruning's form: the original's statistics, gamma 1, beta 0; the same function
    original = randomise_bn(NonAffineBN()).eval()
    narrow = surgery.apply(original, sites, [_sel(16, idx)])
    with torch.no_grad():
        assert surgery.restore_pruned_form(narrow, original, sites, [_sel(16, idx)]) == ["a"]
        assert torch.equal(narrow.bn.running_mean, original.bn.running_mean[idx])
        assert torch.allclose(narrow(x), hand(original, x), atol=1e-5, rtol=1e-4)


def test_batchnorm_with_batch_statistics_is_not_folded():
    report = find_sites(NonAffineBN(track=False).eval())
    assert not report.sites
    assert any("batch statistics" in why for why in report.skipped.values()), report.skipped
