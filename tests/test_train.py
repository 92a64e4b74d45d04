"""The training engine: seeded, learns, and the frozen-BN fine-tuning mode keeps BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from caproj.config import TrainConfig
from caproj.data import load_data
from caproj.models import build_model
from caproj.train import evaluate, fit

from conftest import loaders


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _fit(digits, **kw):
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, in_channels=1)
    cfg = TrainConfig(epochs=6, lr=0.05, batch_size=64, seed=3, **kw)
    train, _, test = loaders(digits, 64)
    hist = fit(model, train, cfg, eval_data=test)
    return model, hist


def test_training_learns_and_is_reproducible(digits):
    a, ha = _fit(digits, bf16=False)
    b, hb = _fit(digits, bf16=False)
    assert ha[-1]["test_acc"] > 50  # 10 classes: chance is 10 %
    assert ha[-1]["test_acc"] == hb[-1]["test_acc"]
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_freeze_bn_keeps_running_statistics_but_learns_affine(digits):
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, in_channels=1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns, "digits-cnn is expected to have BatchNorm"
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone())
              for m in bns]
    train, _, test = loaders(digits, 64)
    fit(model, train, TrainConfig(epochs=6, lr=0.05, batch_size=64, freeze_bn=True, bf16=False))
    for m, (mean, var, w) in zip(bns, before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert not torch.equal(m.weight.detach(), w)
    assert evaluate(model, test)["acc"] > 25  # still learns (chance: 10 %)


def _steps(digits, n: int, ema: float = 0.0):
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, in_channels=1)
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64, seed=3, schedule="constant",
                      bf16=False, max_steps=n, ema=ema)
    train, _, test = loaders(digits, 64)
    hist = fit(model, train, cfg, eval_data=test)
    return model.state_dict(), hist


def test_ema_returns_the_average_of_the_step_weights_and_bn_statistics(digits):
    w1, _ = _steps(digits, 1)
    w2, _ = _steps(digits, 2)
    avg, hist = _steps(digits, 2, ema=0.25)  # first step copied, then lerp by 1 - 0.25
    checked = 0
    for k, v in avg.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.25 * w1[k] + 0.75 * w2[k], rtol=1e-5, atol=1e-6)
            checked += "running" in k
    assert checked > 0, "BN running statistics must be averaged too"
    assert "test_acc_raw" in hist[-1]  # the raw weights' accuracy is reported beside it
    assert hist[-1]["test_acc"] == evaluate(_load(avg), loaders(digits)[2])["acc"]


def _load(state):
    m = build_model("digits-cnn", num_classes=10, in_channels=1)
    m.load_state_dict(state)
    return m


def test_ema_decay_out_of_range_is_refused():
    from caproj.errors import CaprojError

    with pytest.raises(CaprojError, match="ema must be in"):
        TrainConfig(ema=1.0)


def test_feature_weight_adds_caps_reconstruction_term_to_the_loss(digits):
    """feature_weight: + w * mean over the consumers of ||f - f_teacher||^2 / ||f_teacher||^2,
    on the layers a compression narrowed the input of; one step's loss shows exactly that."""
    from caproj import compress
    from caproj.errors import CaprojError
    from caproj.train import feature_layers_of

    torch.manual_seed(0)
    teacher = build_model("digits-cnn", num_classes=10, in_channels=1)
    train, calib, _ = loaders(digits, 64, 256)
    fit(teacher, train, TrainConfig(epochs=1, lr=0.05, batch_size=64, max_steps=20))
    teacher.eval()
    small = compress(teacher, train, widths=[16, 64, 32], steps=0, calib_images=256,
                     progress=False).model  # conv2 keeps its outputs, conv3 does not
    names = feature_layers_of(small, teacher)
    assert names == ["conv2", "fc"]
    for n in names:  # output width kept, input narrowed
        a, b = dict(small.named_modules())[n], dict(teacher.named_modules())[n]
        assert a.weight.shape[0] == b.weight.shape[0] and a.weight.shape != b.weight.shape
    x, y = next(iter(train))
    with torch.no_grad():  # the term by hand, on the first batch, before any step
        fs, ft = {}, {}
        hs = [dict(small.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: fs.__setitem__(n, o)) for n in names]
        hs += [dict(teacher.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: ft.__setitem__(n, o)) for n in names]
        small.train()(x)
        teacher(x)
        for h in hs:
            h.remove()
        term = sum(float((fs[n] - ft[n]).pow(2).sum() / ft[n].pow(2).sum()) for n in names)
        term /= len(names)
    assert term > 0
    losses = {}
    for w in (0.0, 2.0):
        net = copy.deepcopy(small)
        cfg = TrainConfig(epochs=1, lr=0.01, batch_size=64, max_steps=1, bf16=False,
                          channels_last=False, feature_weight=w, kd_weight=0.0)
        losses[w] = fit(net, train, cfg, teacher=teacher)[0]["train_loss"]
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * term, rel=1e-3)
    assert not any(m._forward_hooks for m in teacher.modules())  # the hooks are removed
    with pytest.raises(CaprojError, match="needs a teacher"):
        fit(copy.deepcopy(small), train, TrainConfig(epochs=1, max_steps=1, feature_weight=1.0))
    with pytest.raises(CaprojError, match="no feature layers"):
        fit(copy.deepcopy(teacher), train, TrainConfig(epochs=1, max_steps=1,
                                                       feature_weight=1.0), teacher=teacher)


def test_dense_distillation_is_the_per_pixel_distillation():
    """On (N, C, H, W) logits the distillation term is the classification one over the
    (N*H*W, C) predictions: averaged per pixel, like the per-pixel cross-entropy."""
    from caproj.losses import kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    flat = kd_loss(s.permute(0, 2, 3, 1).reshape(-1, 5), t.permute(0, 2, 3, 1).reshape(-1, 5), 4.0)
    torch.testing.assert_close(kd_loss(s, t, 4.0), flat)
    # the mean of the pixels' own distillation terms, not H*W times it
    per_pixel = torch.stack([kd_loss(s[:, :, h, w], t[:, :, h, w], 4.0)
                             for h in range(3) for w in range(4)])
    torch.testing.assert_close(kd_loss(s, t, 4.0), per_pixel.mean())


def test_label_free_augmentation_is_seeded_and_leaves_labelled_batches_alone():
    """augment=True shifts and flips label-free batches (the teacher labels what the student
    sees), the same way on every run; labelled batches are never augmented."""
    from torch import nn

    from caproj.train import augment_images

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=g)
    a, b = augment_images(x, 3), augment_images(x, 3)
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    teacher = net().eval()
    unlabelled = [x[:4], x[4:]]
    labelled = [(x[:4], torch.tensor([0, 1, 2, 3])), (x[4:], torch.tensor([3, 2, 1, 0]))]
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=4, bf16=False, channels_last=False)

    def trained(data, **kw):
        m = net()
        fit(m, data, cfg.replace(**kw), teacher=teacher, progress_bar=False)
        return m.state_dict()

    plain, aug, again = (trained(unlabelled), trained(unlabelled, augment=True),
                         trained(unlabelled, augment=True))
    assert all(torch.equal(v, again[k]) for k, v in aug.items())
    assert any(not torch.equal(v, plain[k]) for k, v in aug.items())
    with_labels, with_labels_aug = trained(labelled), trained(labelled, augment=True)
    assert all(torch.equal(v, with_labels_aug[k]) for k, v in with_labels.items())


def _tiny_net(seed: int = 1):
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_mixup_blends_label_free_batches_seeded_and_leaves_labelled_ones_alone():
    """mixup > 0 blends each label-free image with the one at the mirrored place in the batch
    (a convex combination, the same on every run); labelled batches are never mixed."""
    from caproj.train import mix_images

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g)
    m, again = mix_images(x, 1.0, 5), mix_images(x, 1.0, 5)
    assert torch.equal(m, again) and m.shape == x.shape and not torch.equal(m, x)
    # each image lies between itself and its partner, with one share per image
    d, xf = (x - x.flip(0)).flatten(1), x.flip(0).flatten(1)
    lam = ((m.flatten(1) - xf) * d).sum(1, keepdim=True) / d.pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(m.flatten(1), xf + lam * d)
    assert bool(((lam >= 0) & (lam <= 1)).all())
    teacher = _tiny_net(2).eval()
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=4, bf16=False, channels_last=False)

    def trained(data, **kw):
        net = _tiny_net()
        fit(net, data, cfg.replace(**kw), teacher=teacher, progress_bar=False)
        return net.state_dict()

    bare = [x[:3], x[3:]]
    plain, mixed, mixed2 = trained(bare), trained(bare, mixup=0.4), trained(bare, mixup=0.4)
    assert all(torch.equal(v, mixed2[k]) for k, v in mixed.items())
    assert any(not torch.equal(v, plain[k]) for k, v in mixed.items())
    labelled = [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([3, 2, 1]))]
    a, b = trained(labelled), trained(labelled, mixup=0.4)
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_holdout_keeps_the_best_weights_the_start_included():
    """With held-out batches, fit hands back the weights that distil best onto them: a
    recipe that only makes the network worse returns the start exactly; one that helps
    returns a trained network no worse than the start on the held-out images."""
    from caproj.train import BestOnHoldout

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g)
    train, held = [x[:8], x[8:16]], [x[16:]]
    teacher = _tiny_net(2).eval()
    keeper = BestOnHoldout(held, teacher, None, None)
    cfg = TrainConfig(epochs=3, batch_size=8, bf16=False, channels_last=False, freeze_bn=True,
                      optimizer="adam", weight_decay=0.0, schedule="constant")
    start = _tiny_net()
    before = keeper.score(start)
    # a rate that wrecks the network: the start comes back, bit for bit (through the API)
    import caproj

    wrecked = copy.deepcopy(start)
    hist = caproj.finetune(wrecked, train, epochs=3, teacher=teacher, holdout=held,
                           progress=False, lr=5.0, batch_size=8, bf16=False,
                           channels_last=False, freeze_bn=True, optimizer="adam",
                           weight_decay=0.0, schedule="constant")
    assert hist[-1]["holdout_best_epoch"] == 0
    assert hist[-1]["holdout_start_loss"] == pytest.approx(before, rel=1e-6)
    assert all(r["holdout_loss"] > before for r in hist)
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in wrecked.state_dict().items())
    # a rate that learns: a later epoch is kept, and it is better on the held-out images
    learned = copy.deepcopy(start)
    hist = fit(learned, train, cfg.replace(lr=0.01, epochs=20), teacher=teacher,
               progress_bar=False, holdout=held)
    best = hist[-1]["holdout_best_epoch"]
    assert best > 0
    assert keeper.score(learned) == pytest.approx(hist[best - 1]["holdout_loss"], rel=1e-5)
    assert keeper.score(learned) < before
