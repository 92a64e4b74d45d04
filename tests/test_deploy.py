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


def test_channels_last_forms_pass_non_image_inputs_through():
    # a latency table times a linear consumer alone (stream sites make the classifier one)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.ReLU()).eval()
    x = torch.randn(3, 64)
    out = deploy.for_inference(lin, "fold_bn_cl", (64,))(x)
    torch.testing.assert_close(out, lin(x))


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


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors", "pt2"])
def test_export_compressed_checkpoint_round_trip(tmp_path, fmt):
    import subprocess
    import sys

    import numpy as np

    from caproj.models import make_checkpoint
    from caproj.sites import require_sites

    torch.manual_seed(0)
    m = randomise_bn(build_model("resnet20"))
    sites = require_sites(m)
    small = surgery.apply(m, sites, [torch.eye(s.channels)[:, : s.channels // 2] for s in sites],
                          calib=[torch.randn(8, 3, 32, 32)])
    torch.save(make_checkpoint(small, "resnet20", compressed=True, input_shape=[3, 32, 32]),
               tmp_path / "c.pt")
    out = tmp_path / f"c.{fmt}"
    r = subprocess.run([sys.executable, "-m", "caproj.cli", "export", "--weights",
                        str(tmp_path / "c.pt"), "--format", fmt, "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = small(x)
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # standard ops only
        ops = {n.op_type for n in model.graph.node}
        assert "Conv" in ops and "BatchNormalization" not in ops  # BN folded into the convs
        got = ort.InferenceSession(str(out)).run(None, {"input": x.numpy()})[0]
        assert np.abs(got - ref.numpy()).max() <= 1e-4 * max(1.0, ref.abs().max().item())
        return
    if fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    elif fmt == "safetensors":  # weights + metadata: caproj rebuilds the narrower model
        from caproj.models import load_model

        loaded, meta = load_model(out)
        assert meta["arch"] == "resnet20" and meta["compressed"]
        got = loaded(x)
    else:
        got = torch.export.load(str(out)).module()(x)
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temp left


def test_export_refuses_a_mismatch_and_writes_nothing(tmp_path, monkeypatch):
    m = randomise_bn(build_model("resnet20"))
    monkeypatch.setitem(deploy._WRITERS, "onnx", lambda *a: torch.zeros(2, 10) + 5)
    with pytest.raises(CaprojError, match="differs from PyTorch .* nothing written"):
        deploy.export(m, "onnx", tmp_path / "m.onnx", (3, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_of_compressed_torchvision_resnet18():
    import onnxruntime as ort

    from caproj.sites import require_sites

    torch.manual_seed(0)
    m = randomise_bn(build_model("tv:resnet18"))
    sites = require_sites(m)
    small = surgery.apply(m, sites, [torch.eye(s.channels)[:, : s.channels // 2] for s in sites],
                          calib=[torch.randn(4, 3, 64, 64)])
    assert small.layer1[0].conv1.out_channels == 32
    data = deploy.export_onnx(small, (3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    got = ort.InferenceSession(data).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = small(x)
    assert (torch.from_numpy(got) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max())


def test_inductor_without_a_compiler_is_a_clear_error():
    import torch._inductor.config as ic
    import torch._inductor.cpp_builder as cb

    def forget_the_compiler() -> None:  # inductor caches what it found out about the compiler
        torch._dynamo.reset()
        for f in vars(cb).values():
            if hasattr(type(f), "cache_clear"):  # functools caches (not a CDLL's lookups)
                f.cache_clear()

    forget_the_compiler()
    # the config's own patch (monkeypatch's undo deletes force_disable_caches, an alias, and
    # every later compilation then fails)
    try:
        with ic.patch({"force_disable_caches": True, "cpp.cxx": ("/nonexistent/c++",)}), \
                pytest.raises(CaprojError, match="'inductor' unavailable here"):
            deploy.for_inference(build_model("digits-cnn"), "inductor", (1, 8, 8))
    finally:  # later tests compile with the real compiler again
        forget_the_compiler()
