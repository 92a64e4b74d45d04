"""Streamed ImageFolder data (--stream): ImageNet-style transforms, determinism independent of
workers and of resuming, batch-aligned torchrun shards, and the CLI jobs running on it."""

import numpy as np
import pytest
import torch

from caproj import data as D
from caproj import dist
from caproj.data import StreamBatches
from caproj.errors import CaprojError
from caproj.stream import Stream

from conftest import caproj


def make_varied_folder(root, classes=("ant", "bee", "cow"), per_class=6, seed=0):
    """JPEGs of different sizes and aspect ratios (what an ImageNet folder looks like)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[..., 0] = arr[..., 0] // 4 + ci * 60  # class-dependent red channel
                Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=95)
    return root


@pytest.fixture
def folder(tmp_path):
    return make_varied_folder(tmp_path / "imgs")


def _all(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


def test_stream_batches_have_the_crop_size_and_labels(folder):
    s = D.load_data(str(folder), 16, stream=True, workers=0)
    assert isinstance(s, Stream) and s.classes == ["ant", "bee", "cow"]
    assert s.input_shape == (3, 16, 16) and s.num_classes == 3
    tr = D.Batches.train_of(s, 4, seed=1)
    assert len(tr) == 18 // 4  # drop_last for training
    xs = _all(tr)
    assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 for x, _ in xs)
    assert -3 < torch.cat([x for x, _ in xs]).mean() < 3  # normalised, not 0..255
    te = _all(D.Batches.test_of(s, 5))
    assert sum(len(y) for _, y in te) == 18
    assert torch.equal(torch.cat([y for _, y in te]), torch.tensor([0] * 6 + [1] * 6 + [2] * 6))


def test_epoch_is_a_function_of_seed_and_epoch_not_of_workers(folder):
    one = Stream.of(str(folder), 16, workers=0)
    two = Stream.of(str(folder), 16, workers=2)
    a, b = D.Batches.train_of(one, 4, seed=3), D.Batches.train_of(two, 4, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(_all(a), _all(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(2)
    other = _all(a)
    a.set_epoch(1)
    assert not torch.equal(other[0][0], _all(a)[0][0])  # a new epoch, new order and crops


def test_resumed_epoch_yields_the_remaining_batches(folder):
    s = Stream.of(str(folder), 16, workers=0)
    b = D.Batches.train_of(s, 4, seed=0)
    b.set_epoch(2)
    full = _all(b)
    b.set_epoch(2, start=2)
    rest = _all(b)
    assert len(rest) == len(full) - 2
    for (x1, y1), (x2, y2) in zip(full[2:], rest, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_ranks_read_their_slices_of_the_same_global_batch(folder, monkeypatch):
    s = Stream.of(str(folder), 16, workers=0)
    whole = _all(D.Batches.train_of(s, 6, seed=0))
    monkeypatch.setattr(dist, "world", lambda: 2)
    parts = []
    for r in range(2):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        b = D.Batches.train_of(s, 6, seed=0)
        assert b.sharded
        parts.append(_all(b))
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts, strict=True):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)


def test_calibration_subset_is_unaugmented_and_fixed(folder):
    s = Stream.of(str(folder), 16, workers=0)
    a = _all(D.Batches.subset_of(s, 7, 4, seed=5))
    b = _all(D.Batches.subset_of(s, 7, 4, seed=5))
    assert [len(y) for _, y in a] == [4, 3]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))


def test_bad_stream_inputs_are_one_line_errors(folder, tmp_path):
    with pytest.raises(CaprojError, match="not a directory"):
        Stream.of(str(tmp_path / "x.tar.gz"))
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(CaprojError, match="train/ and val/"):
        Stream.of(str(tmp_path / "half"))
    (folder / "train" / "bee" / "000.jpg").write_bytes(b"not a jpeg")
    s = Stream.of(str(folder), 16, workers=1)
    with pytest.raises(CaprojError, match=r"^cannot decode image .*000\.jpg") as e:
        for _ in StreamBatches(s, s.train_samples, 18):
            pass
    assert "\n" not in str(e.value)


def test_cli_trains_compresses_and_evaluates_on_a_stream(folder, tmp_path):
    common = ["--data", folder, "--stream", "--image-size", "16", "--workers", "1"]
    r = caproj("train", "--arch", "resnet20", *common, "--epochs", "1", "--batch-size", "6",
               "--out", tmp_path / "r20.pt")
    assert r.returncode == 0, r.stderr
    r = caproj("compress", "--weights", tmp_path / "r20.pt", *common, "--keep", "0.5",
               "--calib-images", "12", "--cap-steps", "2", "--cap-batch-size", "6",
               "--finetune-epochs", "0", "--out", tmp_path / "c.pt")
    assert r.returncode == 0, r.stderr
    r = caproj("eval", "--weights", tmp_path / "c.pt", *common)
    assert r.returncode == 0, r.stderr
    assert "test (18 images)" in r.stdout
    r = caproj("eval", "--weights", tmp_path / "c.pt", "--data", tmp_path / "nope", "--stream")
    assert r.returncode != 0 and "not a directory" in r.stderr.strip().splitlines()[-1]
