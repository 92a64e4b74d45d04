import pytest
import torch
from test_cap import randomise_bn

from caproj import deploy, surgery
from caproj.errors import CaprojError
from caproj.models import build_model


@pytest.mark.parametrize("form", deploy.FORMS)
def test_inference_forms_compute_the_same_function(form):
    torch.manual_seed(0)
    m = randomise_bn(build_model("resnet20"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        out = deploy.for_inference(m, form, (3, 32, 32))(x)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    if form != "eager":  # BN is gone from the deployed graph
        assert "BatchNorm" not in str(deploy.fold_bn(m))


def test_unknown_form():
    with pytest.raises(CaprojError, match="unknown inference form"):
        deploy.for_inference(build_model("digits-cnn"), "tensorrt", (1, 8, 8))


def test_recalibrate_bn_sets_statistics_of_own_features():
    torch.manual_seed(0)
    m = randomise_bn(build_model("digits-cnn"))
    xs = [torch.randn(64, 1, 8, 8) for _ in range(4)]
    surgery.recalibrate_bn(m, xs)
    feats = torch.cat([m.conv1(x) for x in xs])
    assert torch.allclose(m.bn1.running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(m.bn1.running_var, feats.var((0, 2, 3)), rtol=1e-2)
    assert not m.training and m.bn1.momentum == 0.1
