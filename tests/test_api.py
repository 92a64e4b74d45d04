"""The library API: any nn.Module, any iterable of batches; the README snippet; the examples;
staged CaP with resumable state; frozen configuration; plug-in methods; save/load into the
user's own class."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import caproj
from caproj import batches as B
from caproj.coverage import randomise_bn
from caproj.models import build_model

ROOT = Path(__file__).resolve().parents[1]
HAS_TIMM = __import__("importlib").util.find_spec("timm") is not None


class Branchy(nn.Module):
    """A user's own CNN: in no zoo, torch.cat and flatten in its forward, a conv with its own
    bias followed by BN, and a dict output."""

    def __init__(self, dict_out: bool = False) -> None:
        super().__init__()
        self.dict_out = dict_out
        self.a = nn.Conv2d(3, 16, 3, padding=1)  # own bias + BN
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.d = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24 * 2 * 2, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x)))
        y = F.relu(self.b(x))
        x = torch.cat([y, F.relu(self.c(y))], 1)
        x = F.adaptive_avg_pool2d(F.relu(self.d(x)), 2)
        out = self.fc(torch.flatten(x, 1))
        return {"logits": out} if self.dict_out else out


def loader(n=96, batch=16, labels=True, shape=(3, 8, 8), classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    if not labels:
        return DataLoader(x, batch_size=batch)
    return DataLoader(TensorDataset(x, torch.randint(0, classes, (n,), generator=g)),
                      batch_size=batch)


def model_of(**kw) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(Branchy(**kw))


def test_readme_api_snippet_runs_verbatim(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no marked API example"
    code = m.group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    assert (tmp_path / "resnet18-cap.pt").is_file()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ns["small"](x), ns["res"].model(x), rtol=0, atol=1e-5)
    rep = ns["res"].report
    assert abs(rep["macs_after"] / rep["macs_before"] - 0.5) <= 0.005


@pytest.mark.parametrize("name, expect", [
    ("custom_model.py", "reloaded into a fresh TwoBranchNet"),
    ("label_free.py", "data-free CaP from 512 synthetic images"),
    pytest.param("timm_model.py", "keep=1.0 exact", marks=pytest.mark.skipif(
        not HAS_TIMM, reason="needs timm")),
    pytest.param("hf_resnet.py", "reloaded into a fresh ResNetForImageClassification (max "
                 "logit diff", marks=pytest.mark.skipif(
                     importlib.util.find_spec("transformers") is None,
                     reason="needs transformers")),
])
def test_examples_run(name, expect, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert expect in r.stdout


def test_compress_a_user_model_from_a_plain_dataloader(tmp_path):
    model = model_of()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = caproj.compress(model, loader(), target_macs=0.5, steps=6, calib_images=64,
                          batch_size=32, channel_multiple=1, finetune=1, eval_data=loader(),
                          progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    rep = res.report
    assert abs(rep["macs_after"] / rep["macs_before"] - 0.5) <= 0.005
    assert rep["params_after"] < rep["params_before"] and rep["seed"] == 0
    assert {"acc_before", "acc_after_compress", "acc_after_finetune"} <= set(rep)
    assert rep["label_free"] is False and len(rep["cap_history"]) == 6
    assert res.model.a.out_channels < 16  # physically narrower, a plain module
    umask = os.umask(0)
    os.umask(umask)
    for fmt in ("pt", "safetensors"):
        path = tmp_path / f"small.{fmt}"
        caproj.save(res.model, path)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
        again = caproj.load(path, model=Branchy())
        x = torch.randn(3, 3, 8, 8)
        with torch.no_grad():
            assert (again(x) - res.model(x)).abs().max().item() <= 1e-5


def test_batches_of_any_size_and_form_give_the_same_compression():
    """CaP regroups batches to its own batch size: (x, y) tuples of 16 or 48, or a list of
    [x, y] lists, give identical weights."""
    model = model_of()
    kw = dict(target_macs=0.5, steps=4, calib_images=48, batch_size=48, progress=False)
    a = caproj.compress(model, loader(batch=16), **kw).model.state_dict()
    b = caproj.compress(model, loader(batch=48), **kw).model.state_dict()
    c = caproj.compress(model, [[x, y] for x, y in loader(batch=24)], **kw).model.state_dict()
    for other in (b, c):
        assert all(torch.allclose(a[k].float(), other[k].float(), atol=1e-5) for k in a)


def test_label_free_data_and_dict_outputs_with_a_custom_loss():
    model = model_of(dict_out=True)
    pick = lambda out: out["logits"]  # noqa: E731
    res = caproj.compress(model, loader(labels=False), target_macs=0.6, steps=4,
                          calib_images=48, batch_size=32, output_transform=pick, progress=False)
    assert res.report["label_free"] is True
    assert "acc" not in res.report["cap_history"][0]  # no labels, no accuracy invented
    calls = []

    def loss(out, y):
        calls.append(len(y))
        return F.cross_entropy(out, y)

    caproj.compress(model, loader(), target_macs=0.6, steps=3, calib_images=48, batch_size=32,
                    output_transform=pick, loss_fn=loss, progress=False)
    assert calls == [32, 32, 32]
    r = caproj.evaluate(res.model, loader(), output_transform=pick, progress=False)
    assert 0 <= r["acc"] <= 100 and r["n"] == 96
    with pytest.raises(caproj.CaprojError, match="labelled"):
        caproj.evaluate(res.model, loader(labels=False), output_transform=pick)
    with pytest.raises(caproj.CaprojError, match="output_transform"):
        caproj.evaluate(model, loader())


def _staged(model, steps, state=None):
    cap = caproj.CaP(model, torch.zeros(1, 3, 8, 8), target_macs=0.5, steps=8,
                     calib_images=48, batch_size=32, channel_multiple=1, bf16=False,
                     log_every=0)
    if state is not None:
        cap.load_state_dict(state)
    cap.calibrate(loader())
    cap.optimise(loader(), steps)
    return cap


def test_staged_cap_state_dict_resumes_to_the_same_result(tmp_path):
    model = model_of()
    whole = _staged(model, 8).finalize()
    half = _staged(model, 4)
    path = tmp_path / "state.pt"
    torch.save(half.state_dict(), path)
    resumed = _staged(model, 8, torch.load(path, weights_only=True))
    assert resumed.step == 8 and len(resumed.history) == 8
    out = resumed.finalize()
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(out.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    other = caproj.CaP(model, torch.zeros(1, 3, 8, 8), target_macs=0.6)
    with pytest.raises(caproj.CaprojError, match="other settings"):
        other.load_state_dict(half.state_dict())


def test_config_is_resolved_once_and_cannot_drift():
    """The ablation bug: setting cap.cfg.lr after construction used to be ignored silently.
    Now the config is frozen, and rates given as options are the rates the optimisers use."""
    model = model_of()
    cap = caproj.CaP(model, torch.zeros(1, 3, 8, 8), target_macs=0.5, steps=2, lr=5e-4,
                     weight_lr=2e-5, calib_images=32, batch_size=16, log_every=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cap.cfg.lr = 1e-2  # type: ignore[misc]
    cap.calibrate(loader())
    cap.optimise(loader())
    rates = {g["base_lr"] for o in cap._opt.all for g in o.param_groups}
    assert rates == {5e-4, 2e-5}
    assert cap.cfg.lr == 5e-4 and cap.cfg.weight_lr == 2e-5
    with pytest.raises(caproj.CaprojError, match="unknown CapConfig option 'lrate'"):
        caproj.CaP(model, torch.zeros(1, 3, 8, 8), lrate=1.0)


def test_plug_in_methods_custom_score_and_registry():
    model = model_of()
    sites = caproj.find_sites(model).sites
    last = caproj.Selection(lambda m, s: torch.arange(s.channels, dtype=torch.float))
    res = caproj.compress(model, loader(), keep=0.5, method=last, progress=False)
    assert res.report["method"] == "selection"
    with torch.no_grad():  # site a -> b keeps a's last 8 channels: b reads exactly those
        assert torch.equal(res.model.b.weight, model.b.weight[:, 8:])
    bad = caproj.Selection(lambda m, s: torch.ones(3))
    with pytest.raises(caproj.CaprojError, match="must be .* finite numbers"):
        caproj.compress(model, loader(), keep=0.5, method=bad, progress=False)

    class Halve:
        name = "first-half"

        def __call__(self, job):
            ps = [torch.eye(s.channels)[:, :k] for s, k in zip(job.sites, job.widths,
                                                                strict=True)]
            from caproj import surgery

            return surgery.apply(job.model, job.sites, ps, calib=job.calib)

    caproj.register_method("first-half", Halve(), replace=True)
    try:
        assert "first-half" in caproj.METHODS
        out = caproj.compress(model, loader(), keep=0.5, method="first-half", progress=False)
        assert out.widths == [s.channels // 2 for s in sites]
        with pytest.raises(caproj.CaprojError, match="already registered"):
            caproj.register_method("first-half", Halve())
    finally:
        caproj.METHODS.pop("first-half")


@pytest.mark.parametrize("arch", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                                  "vgg16_bn", "digits-cnn"])
def test_keep_one_through_the_api_is_exact_for_every_zoo_arch(arch):
    torch.manual_seed(0)
    shape = (1, 8, 8) if arch == "digits-cnn" else (3, 32, 32)
    model = randomise_bn(build_model(arch, in_channels=shape[0]))
    data = loader(n=8, batch=4, shape=shape, classes=10)
    small = caproj.compress(model, data, keep=1.0, steps=0, calib_images=8,
                            progress=False).model
    x = torch.randn(2, *shape)
    with torch.no_grad():
        ref = model(x)
        assert (small(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


TIMM_FAMILIES = ["resnet18d", "seresnet18", "regnetx_002", "efficientnet_b0",
                 "mobilenetv3_small_050", "convnext_atto", "densenet121", "vgg11_bn",
                 "dla34", "rexnet_100", "ghostnet_100", "cspresnet50"]


@pytest.mark.skipif(not HAS_TIMM, reason="needs timm")
@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_keep_one_through_the_api_is_exact_for_timm_families(name):
    import timm

    torch.manual_seed(0)
    model = randomise_bn(timm.create_model(name, pretrained=False, num_classes=10))
    data = loader(n=4, batch=4, shape=(3, 64, 64), classes=10)
    try:
        small = caproj.compress(model, data, keep=1.0, steps=0, calib_images=4,
                                progress=False).model
    except caproj.CaprojError as e:  # refused up front, in one line naming the obstacle
        assert "no compressible site" in str(e) or "cannot trace" in str(e)
        pytest.skip(f"{name} refused: {e}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert (small(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_bad_api_inputs_name_the_parameter():
    model = model_of()
    cases = [
        (lambda: caproj.compress("resnet", loader()), "model"),
        (lambda: caproj.compress(model, 42), "data"),
        (lambda: caproj.compress(model, []), "data"),
        (lambda: caproj.compress(model, loader(), target_macs=1.5), "target_macs"),
        (lambda: caproj.compress(model, loader(), target_macs=0.5, keep=0.5), "keep"),
        (lambda: caproj.compress(model, loader(), stepz=3), "stepz"),
        (lambda: caproj.compress(model, loader(), method="magic"), "method"),
        (lambda: caproj.finetune(model, loader(), epochs=1, kd_weight=0.5), "teacher"),
        (lambda: caproj.compress(model, [("not a tensor",)]), "data"),
    ]
    for call, param in cases:
        with pytest.raises(caproj.CaprojError) as e:
            call()
        assert e.value.param == param, (param, str(e.value))


def test_rebatch_regroups_and_keeps_a_short_pass():
    xs = [(torch.full((7, 1), float(i)), torch.arange(7)) for i in range(5)]  # 35 images
    out = list(B.rebatch(xs, 16))
    assert [len(x) for x, _ in out] == [16, 16]  # the 3-image tail is dropped
    assert torch.equal(out[0][0][:7, 0], torch.zeros(7)) and out[1][0][0, 0] == 2.0
    assert [len(x) for x, _ in B.rebatch(xs[:1], 16)] == [7]  # shorter than one batch: kept
    unl = list(B.rebatch([(torch.zeros(5, 1), None)] * 4, 8))
    assert [len(x) for x, _ in unl] == [8, 8] and unl[0][1] is None


def test_fit_chunks_bounds_the_largest_activation_of_a_calibration_batch():
    """An image's largest activation here is 64 x 8 x 8 floats (16 KiB, the widening conv);
    with 40 KiB per batch, 250-image batches become batches of 2, in order, and batches that
    already fit are returned as they are."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 1)).train()
    xs = [torch.randn(5, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    out = B.fit_chunks(model, xs, max_bytes=40 << 10)
    assert [len(x) for x in out] == [2, 2, 1, 2, 1]
    assert torch.equal(torch.cat(out), torch.cat(xs)) and model.training
    assert B.fit_chunks(model, xs, max_bytes=5 * (16 << 10)) is xs


def test_load_rebuilds_zoo_architectures_from_metadata(tmp_path):
    model = build_model("resnet20").eval()
    res = caproj.compress(model, loader(n=16, batch=8, shape=(3, 32, 32), classes=10),
                          keep=0.5, steps=0, calib_images=16, progress=False)
    caproj.save(res.model, tmp_path / "r20.pt", arch="resnet20")
    again = caproj.load(tmp_path / "r20.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), res.model(x))
    nan = {k: v.clone() for k, v in res.model.state_dict().items()}
    nan["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(caproj.CaprojError, match="'conv1.weight' has 1 non-finite"):
        caproj.load(tmp_path / "nan.pt", model=build_model("resnet20"))


def test_label_free_never_reads_the_labels():
    """label_free=True on a labelled loader: labels that are all wrong give the same weights,
    in CaP and in the fine-tuning (issue 19's check); with labels read they would differ."""
    model = model_of()
    right = loader()
    g = torch.Generator().manual_seed(7)
    wrong = DataLoader(TensorDataset(right.dataset.tensors[0],
                                     torch.randint(0, 5, (96,), generator=g)), batch_size=16)
    kw = dict(target_macs=0.5, steps=4, calib_images=48, batch_size=32, finetune=1,
              progress=False)
    a = caproj.compress(model, right, label_free=True, **kw)
    b = caproj.compress(model, wrong, label_free=True, **kw)
    assert a.report["label_free"] and b.report["label_free"]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    c = caproj.compress(model, wrong, **kw)  # labels read: the weights change
    assert any(not torch.equal(v, c.model.state_dict()[k])
               for k, v in a.model.state_dict().items())


def _confident(seed: int = 0) -> nn.Module:
    """A small net with confident logits (its argmax labels give a low loss)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[3].weight.mul_(20)
    return randomise_bn(net).eval()


def _labelled_by(net: nn.Module | None, seed: int, n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1) if net is not None else torch.randint(0, 5, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_measure_fit_says_where_the_original_does_not_fit_its_training_data():
    net = _confident()
    fits = caproj.measure_fit(net, _labelled_by(net, 0), _labelled_by(None, 1))
    assert fits["fits"] is True and fits["ratio"] < 0.1 < fits["test_loss"]
    assert fits["threshold"] == caproj.config.LEARN_RATIO
    # the same network on training labels it does not predict: as lost as on the test set
    lost = caproj.measure_fit(net, _labelled_by(None, 2), _labelled_by(None, 1))
    assert lost["fits"] is False and lost["ratio"] > caproj.config.LEARN_RATIO
    assert lost["train_loss"] == pytest.approx(
        caproj.evaluate(net, _labelled_by(None, 2), progress=False)["loss"])
    assert caproj.measure_fit(net, _labelled_by(net, 0), None)["fits"] is None
    # a test loss already measured is used, not measured again
    given = caproj.measure_fit(net, _labelled_by(None, 2), _labelled_by(None, 1), test_loss=1e3)
    assert given["test_loss"] == 1e3 and given["fits"] is True
    unlabelled = DataLoader(torch.randn(32, 3, 8, 8), batch_size=16)
    assert caproj.measure_fit(net, unlabelled, _labelled_by(None, 1))["fits"] is None


def test_compress_takes_the_preset_it_chose_and_the_options_given():
    common = dict(target_macs=0.5, steps=2, calib_images=32, batch_size=16, channel_multiple=1,
                  progress=False)
    net, test = _confident(), _labelled_by(None, 1)
    learn = caproj.PRESETS["learn"]
    auto = caproj.compress(net, _labelled_by(None, 2), finetune={"epochs": 1, "max_steps": 1},
                           eval_data=test, **common).report
    assert auto["preset"]["name"] == "learn" and auto["fit"]["fits"] is False
    assert auto["fit"]["test_loss"] == pytest.approx(
        caproj.evaluate(net, test, progress=False)["loss"])  # the one evaluation of the original
    assert (auto["finetune_config"]["lr"], auto["finetune_config"]["kd_weight"]) == \
        (dict(learn.finetune)["lr"], dict(learn.finetune)["kd_weight"])
    # the selection, refitted and rescaled, no CaP steps (measured best on such starts;
    # steps=2 given here overrides them)
    assert auto["cap_config"]["match_scale"] is True and dict(learn.cap)["steps"] == 0
    assert auto["preset"]["overridden"] == ["steps"]
    fits = caproj.compress(net, _labelled_by(net, 0), finetune={"epochs": 1, "max_steps": 1},
                           eval_data=test, **common).report
    assert fits["preset"]["name"] == "shallow"
    # issue 36: at 50 % MACs no CaP steps + lr 0.02 beat CaP's steps + the polish recipe
    assert (fits["finetune_config"]["lr"], fits["finetune_config"]["kd_weight"]) == (0.02, 0.5)
    assert dict(caproj.PRESETS["shallow"].cap)["steps"] == 0  # steps=2 given here wins
    assert fits["preset"]["overridden"] == ["steps"] and fits["cap_config"]["match_scale"] is True
    assert fits["cap_config"]["ridge_to"] == "projected"
    assert fits["cap_config"]["kd"] == caproj.CAP.kd
    # options given win over the preset's, and the report names them
    mine = caproj.compress(net, _labelled_by(None, 2), preset="learn", kd=0.25, eval_data=test,
                           finetune={"epochs": 1, "max_steps": 1, "lr": 0.01}, **common).report
    assert mine["preset"]["name"] == "learn" and mine["preset"]["reason"] == "chosen by name"
    assert mine["finetune_config"]["lr"] == 0.01
    assert mine["preset"]["overridden"] == ["lr", "steps"]  # kd: not a setting of learn
    assert mine["cap_config"]["kd"] == 0.25 and mine["finetune_config"]["kd_weight"] == 0.0
    # a TrainConfig is used as given: no preset recipe, no budget split
    given = caproj.compress(net, _labelled_by(None, 2), eval_data=test, **common,
                            finetune=caproj.TrainConfig(epochs=1, max_steps=1, lr=0.003))
    assert given.report["finetune_config"]["lr"] == 0.003
    with pytest.raises(caproj.CaprojError, match="unknown preset 'fast'") as e:
        caproj.compress(net, _labelled_by(None, 2), finetune=1, preset="fast", **common)
    assert e.value.param == "preset"


def test_wrapped_models_and_dict_batches_as_users_hold_them():
    """torch.compile / DataParallel wrappers are unwrapped; Hugging Face style dict batches are
    read by their default keys or the keys given; the result equals the plain run's."""
    model = model_of()
    plain = caproj.compress(model, loader(), keep=0.5, steps=2, calib_images=32, batch_size=16,
                            log_every=0, progress=False, preset=None)
    x = torch.randn(4, 3, 8, 8)
    dicts = [{"pixel_values": a, "labels": b} for a, b in loader()]
    for wrapped, data, keys in (
            (torch.compile(model), loader(), {}),
            (nn.DataParallel(model), dicts, {}),
            (model, [{"img": a, "cls": b} for a, b in loader()],
             {"input_key": "img", "target_key": "cls"})):
        res = caproj.compress(wrapped, data, keep=0.5, steps=2, calib_images=32, batch_size=16,
                              log_every=0, progress=False, preset=None, **keys)
        assert res.widths == plain.widths
        with torch.no_grad():
            torch.testing.assert_close(res.model(x), plain.model(x))
    acc = caproj.evaluate(nn.DataParallel(model), (b for b in dicts), progress=False)
    assert acc == caproj.evaluate(model, loader(), progress=False)  # one pass: a generator will do
    hist = caproj.finetune(plain.model, [{"image": a, "label": b} for a, b in loader()],
                           epochs=1, progress=False)
    assert hist[0]["train_acc"] is not None  # the labels were read
