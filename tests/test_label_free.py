"""Label-free and data-free compression (issue 19): unlabeled image folders, accuracy only from
labelled data, BatchNorm-statistics synthesis (it lowers the loss it optimises, is seeded and
resumable, leaves the model as it was), and data-free compression through the API and CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import caproj
from caproj import synth
from caproj.coverage import randomise_bn
from caproj.data import Batches, load_data
from caproj.models import build_model, make_checkpoint

from conftest import caproj as caproj_cli
from conftest import make_image_folder


def bn_net(seed: int = 0) -> nn.Module:
    """A small CNN whose BatchNorm layers remember the statistics of a "training set" unlike
    noise: smooth images with a colour cast."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None  # running statistics = the average over the batches below
    m.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(8):
            x = F.avg_pool2d(torch.randn(64, 3, 14, 14, generator=g), 3, 1) * 2
            m(x + torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1))
    return m.eval()


def test_flat_and_explicit_unlabeled_folders_have_no_labels(tmp_path):
    flat = tmp_path / "flat"
    (flat / "deeper" / "still").mkdir(parents=True)
    for i, where in enumerate([flat, flat, flat / "deeper", flat / "deeper" / "still"]):
        Image.new("RGB", (10, 10), (i * 40, 3, 9)).save(where / f"{i}.png")
    d = load_data(str(flat))  # images at the top level: unlabeled, recursively
    assert not d.labelled and d.train_y is None and len(d.train_x) == 4 and len(d.test_x) == 0
    assert d.describe()["labelled"] is False and d.describe()["train"] == 4
    batch = next(iter(Batches.train_of(d, 2)))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 3, 10, 10)  # bare images
    with pytest.raises(caproj.CaprojError, match="holds unlabeled images: measuring accuracy"):
        Batches.test_of(d)
    tree = make_image_folder(tmp_path / "tree", per_class=2)  # an ImageFolder read label-free
    u = load_data(f"unlabeled:{tree}")
    assert not u.labelled and len(u.train_x) == 3 * 2 * 2  # train/ and test/, every class
    assert load_data(str(tree)).labelled  # the same tree with its labels
    with pytest.raises(caproj.CaprojError, match="stream=True reads ImageFolder"):
        load_data(f"unlabeled:{tree}", stream=True)


def test_synthesis_lowers_the_bn_statistics_loss_and_leaves_the_model_alone():
    model = bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    syn = caproj.synthesize(model, 24, (3, 12, 12), steps=40, batch_size=12, progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert syn.images.shape == (24, 3, 12, 12) and len(syn) == 24
    rep = syn.report
    assert len(rep["batches"]) == 2 and rep["n"] == 24 and rep["classes"] == 4
    assert rep["bn_loss_end"] < 0.5 * rep["bn_loss_start"], rep
    noise = torch.randn(24, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert synth.bn_statistics_loss(model, syn.images) < \
        0.5 * synth.bn_statistics_loss(model, noise)
    # the data-free batches are bare, augmented images, as label-free jobs read them
    x = next(iter(syn.batches(8, train=True)))
    assert isinstance(x, torch.Tensor) and x.shape == (8, 3, 12, 12)


def test_synthesis_is_seeded_resumable_and_cached(tmp_path, monkeypatch):
    model = bn_net()
    kw = dict(steps=5, batch_size=4, progress=False)
    a = caproj.synthesize(model, 10, (3, 12, 12), **kw)
    b = caproj.synthesize(model, 10, (3, 12, 12), **kw)
    assert torch.equal(a.images, b.images)
    c = caproj.synthesize(model, 10, (3, 12, 12), seed=1, **kw)
    assert not torch.equal(a.images, c.images)

    real = synth._one_batch
    calls = []

    def dies_in_batch_two(*args, **kwargs):
        calls.append(args[6])
        if args[6] == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # stopped mid-run, after batch 0 was saved
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "_one_batch", dies_in_batch_two)
    state = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        caproj.synthesize(model, 10, (3, 12, 12), state_path=state, **kw)
    assert (tmp_path / "run.synth-state.pt").is_file()
    r = caproj.synthesize(model, 10, (3, 12, 12), state_path=state, resume=True, **kw)
    assert calls == [0, 1, 1, 2]  # batch 0 came from the state file
    assert torch.equal(r.images, a.images)
    assert not (tmp_path / "run.synth-state.pt").exists()

    monkeypatch.setenv("CAPROJ_CACHE", str(tmp_path / "cache"))
    first = caproj.synthesize(model, 10, (3, 12, 12), cache=True, **kw)
    calls.clear()
    again = caproj.synthesize(model, 10, (3, 12, 12), cache=True, **kw)
    assert calls == [] and torch.equal(first.images, again.images)  # read, not recomputed
    assert len(list((tmp_path / "cache" / "synthetic").glob("*.pt"))) == 1


def test_data_free_compress_is_label_free_and_reproducible():
    model = bn_net()
    kw = dict(synthetic=16, example_inputs=torch.zeros(1, 3, 12, 12), target_macs=0.5,
              steps=3, calib_images=16, batch_size=8, finetune=1, progress=False,
              synth_options={"steps": 5, "batch_size": 8})
    a = caproj.compress(model, **kw)
    b = caproj.compress(model, **kw)
    assert a.report["label_free"] is True
    df = a.report["data_free"]
    assert df["n"] == 16 and df["bn_loss_end"] < df["bn_loss_start"]
    assert df["config"]["steps"] == 5
    assert a.report["macs_after"] < a.report["macs_before"]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert "finetune" in a.report  # distillation-only fine-tuning on the synthetic images


@pytest.fixture
def r20_folder(tmp_path):
    """A random-weights ResNet-20 checkpoint for 3 classes and a labelled 12-px folder."""
    torch.manual_seed(0)
    ck = tmp_path / "r20.pt"
    torch.save(make_checkpoint(randomise_bn(build_model("resnet20", num_classes=3)), "resnet20",
                               num_classes=3, input_shape=[3, 12, 12]), ck)
    return ck, make_image_folder(tmp_path / "tiny", per_class=4)


def test_cli_compresses_from_unlabeled_images_and_reports_accuracy_only_with_labels(
        r20_folder, tmp_path):
    ck, tree = r20_folder
    common = ["--weights", ck, "--target-macs", "0.5", "--cap-steps", "2", "--calib-images",
              "12", "--cap-batch-size", "6", "--batch-size", "6", "--latency", "none"]
    out = tmp_path / "u.pt"
    r = caproj_cli("compress", "--data", f"unlabeled:{tree / 'train'}", *common, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "accuracy not measured" in r.stdout and "label-free" in r.stdout
    m = torch.load(out, weights_only=True)["metrics"]
    assert m["label_free"] is True and m.get("acc_before") is None
    out2 = tmp_path / "u2.pt"
    r = caproj_cli("compress", "--data", f"unlabeled:{tree / 'train'}", "--eval-data", tree,
                   *common, "--finetune-epochs", "1", "--out", out2)
    assert r.returncode == 0, r.stderr
    m2 = torch.load(out2, weights_only=True)["metrics"]
    assert m2["label_free"] is True
    assert isinstance(m2["acc_before"], float) and isinstance(m2["acc_after_finetune"], float)
    assert "top-1 accuracy" in r.stdout and "not measured" not in r.stdout


def test_cli_data_free_compress(r20_folder, tmp_path):
    ck, tree = r20_folder
    out = tmp_path / "s.pt"
    r = caproj_cli("compress", "--weights", ck, "--data", "synthetic:12", "--synth-steps", "3",
                   "--synth-batch-size", "6", "--eval-data", tree, "--target-macs", "0.5",
                   "--cap-steps", "2", "--calib-images", "12", "--cap-batch-size", "6",
                   "--latency", "none", "--out", out, "--report", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert "12 synthetic images" in r.stdout
    saved = torch.load(out, weights_only=True)
    assert saved["data"]["synthetic"] == 12 and saved["input_shape"] == [3, 12, 12]
    assert saved["metrics"]["data_free"]["n"] == 12
    assert not list(tmp_path.glob("*state.pt"))  # the synthesis state is gone once done


def test_a_small_training_set_lowers_the_default_rates():
    """Many passes over few images (1,000 images x 600 steps of 128) made ResNet-56's loss
    climb at the default rates; a re-used set gets at most a third of them, and
    sqrt(10 / passes) beyond; given rates are kept."""
    from caproj.config import CapConfig

    full = CapConfig(train_images=50_000).resolve(streams=False)
    assert (full.lr, full.weight_lr) == (1e-3, 3e-4)
    small = CapConfig(train_images=1000).resolve(streams=False)  # 77 passes
    assert small.lr == pytest.approx(1e-3 / 3) and small.weight_lr == pytest.approx(1e-4)
    assert CapConfig(train_images=5000).resolve(streams=False).lr == pytest.approx(1e-3 / 3)
    k = (10 / (600 * 128 / 100)) ** 0.5  # 768 passes over 100 images
    assert CapConfig(train_images=100).resolve(streams=False).lr == pytest.approx(1e-3 * k)
    assert CapConfig(train_images=1000, lr=5e-4).resolve(streams=False).lr == 5e-4
    assert CapConfig().resolve(streams=False).lr == 1e-3  # unknown size: the defaults
    with pytest.raises(caproj.CaprojError, match="train_images must be an integer >= 1"):
        CapConfig(train_images=0)
    model = bn_net()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(6)]  # 96 images
    res = caproj.compress(model, batches, target_macs=0.5, steps=60, batch_size=32,
                          calib_images=48, progress=False)
    cfg = res.report["cap_config"]
    assert cfg["train_images"] == 96  # counted from the data: 20 passes
    assert cfg["lr"] == pytest.approx(1e-3 / 3)
