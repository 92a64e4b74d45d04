import pytest
import torch

from caproj import metrics
from caproj.errors import CaprojError
from caproj.models import build_model, load_model, make_checkpoint, read_checkpoint

from conftest import MODELS, needs_models


@pytest.mark.parametrize("arch, macs, params", [
    ("resnet20", 40_551_040, 269_722),
    ("resnet56", 125_485_696, 853_018),
])
def test_macs_and_params_of_cifar_resnets(arch, macs, params):
    m = build_model(arch)
    assert metrics.count_macs(m, (3, 32, 32)) == macs  # 40.55 M / 125.49 M as published
    assert metrics.count_params(m) == params


def test_macs_of_torchvision_resnet18():
    m = build_model("tv:resnet18", num_classes=1000)
    assert round(metrics.count_macs(m, (3, 224, 224)) / 1e9, 2) == 1.81  # torchvision: 1.81 GFLOPS


def test_layer_table_sums_to_total():
    m = build_model("resnet20")
    rows = metrics.layer_table(m, (3, 32, 32))
    assert sum(r["macs"] for r in rows) == metrics.count_macs(m, (3, 32, 32))
    conv1 = next(r for r in rows if r["layer"] == "conv1")
    assert conv1["macs"] == 16 * 3 * 9 * 32 * 32 and conv1["out_shape"] == (16, 32, 32)


def test_peak_activation_memory_grows_with_width_and_batch():
    narrow = metrics.peak_activation_bytes(build_model("resnet20"), (3, 32, 32))
    wide = metrics.peak_activation_bytes(build_model("vgg16_bn"), (3, 32, 32))
    assert 16 * 32 * 32 * 4 <= narrow < wide  # at least one full-res feature map
    assert metrics.peak_activation_bytes(build_model("resnet20"), (3, 32, 32), batch=4) > \
        3 * narrow


def test_latency_is_positive_and_counts_runs():
    lat = metrics.measure_latency(build_model("digits-cnn"), (1, 8, 8), batch=2, runs=12,
                                  warmup=2)
    assert lat.median_ms > 0 and lat.runs >= 12 and lat.p90_ms >= lat.median_ms


@pytest.mark.parametrize("wrap", ["module_prefix", "plain", "caproj"])
def test_checkpoint_formats_load(tmp_path, wrap):
    m = build_model("resnet20")
    sd = m.state_dict()
    if wrap == "module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 91.7}
    elif wrap == "plain":
        obj = sd
    else:
        obj = make_checkpoint(m, "resnet20", num_classes=10, seed=1)
    torch.save(obj, tmp_path / "w.th")
    loaded, meta = load_model(tmp_path / "w.th", None if wrap == "caproj" else "resnet20")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert meta["arch"] == "resnet20"


def test_mismatched_checkpoint_names_first_bad_key(tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.th")
    with pytest.raises(CaprojError, match="does not fit resnet56: missing key 'layer1.3"):
        load_model(tmp_path / "r20.th", "resnet56")
    torch.save(build_model("resnet20", num_classes=100).state_dict(), tmp_path / "c100.th")
    with pytest.raises(CaprojError, match=r"'linear.weight' has shape \(100, 64\)"):
        load_model(tmp_path / "c100.th", "resnet20", num_classes=10)
    sd = build_model("resnet20").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.th")
    with pytest.raises(CaprojError, match="unexpected key 'extra.weight'"):
        load_model(tmp_path / "extra.th", "resnet20")


def test_corrupt_truncated_and_pickled_checkpoints(tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "ok.th")
    blob = (tmp_path / "ok.th").read_bytes()
    (tmp_path / "trunc.th").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "junk.th").write_bytes(b"definitely not a checkpoint")
    torch.save({"model": build_model("digits-cnn")}, tmp_path / "pickled.th")  # a whole module
    for name in ("trunc.th", "junk.th", "pickled.th"):
        with pytest.raises(CaprojError, match="cannot read checkpoint") as e:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(CaprojError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.th")


def test_unknown_arch_lists_choices():
    with pytest.raises(CaprojError, match="unknown architecture 'resnet57'.*resnet56"):
        build_model("resnet57")
    with pytest.raises(CaprojError, match="unknown torchvision"):
        build_model("tv:notamodel")


def test_torchvision_models_by_name():
    m = build_model("tv:resnet18", num_classes=7)
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


@needs_models
def test_shared_checkpoints_load_strictly():
    for arch in ("resnet20", "resnet56"):
        for f in MODELS.glob(f"{arch}-*.th"):
            m, _ = load_model(f, arch)
            assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, build", [
    ("mnasnet0_5", {}),  # its loader reads the per-module versions in _metadata
    ("googlenet", {"aux_logits": False, "init_weights": False}),  # torchvision's own layout
    ("googlenet", {"aux_logits": True, "init_weights": False}),
    ("inception_v3", {"aux_logits": False, "init_weights": False}),
])
def test_torchvision_state_dicts_as_users_save_them_load(tmp_path, name, build):
    """`torch.save(model.state_dict())`, plain or from a DataParallel (`module.` keys): the
    model is built to fit the checkpoint and the weights load exactly."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.get_model(name, weights=None, num_classes=7, **build).eval()
    for prefix in ("", "module."):
        sd = ref.state_dict()
        if prefix:
            sd = torch.nn.DataParallel(ref).state_dict()
        torch.save(sd, tmp_path / "w.pth")
        model, _ = load_model(tmp_path / "w.pth", f"tv:{name}")
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        assert model.training is False
