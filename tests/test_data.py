import tarfile
import zipfile

import pytest
import torch

from caproj import data as D
from caproj.errors import CaprojError

from conftest import make_image_folder, needs_cifar


def test_folder_loads_with_labels_from_sorted_classes(image_folder):
    s = D.load_data(str(image_folder))
    assert s.classes == ["cat", "dog", "fox"]
    assert s.train_x.shape == (18, 3, 12, 12) and s.train_x.dtype == torch.uint8
    assert s.test_x.shape == (18, 3, 12, 12)
    # the fixture writes the class index into pixel (0,0), red channel = class * 40
    assert torch.equal(s.train_x[:, 0, 0, 0].long(), s.train_y * 40)
    assert s.mean == D.IMAGENET_MEAN


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_loads_same_as_folder(image_folder, tmp_path, kind):
    arc = tmp_path / f"tiny.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(arc, "w") as z:
            for f in sorted(image_folder.rglob("*.png")):
                z.write(f, "tiny/" + str(f.relative_to(image_folder)))
    else:
        with tarfile.open(arc, "w:gz") as t:
            t.add(image_folder, arcname="tiny")
    a, f = D.load_data(str(arc)), D.load_data(str(image_folder))
    assert torch.equal(a.train_x, f.train_x) and torch.equal(a.test_y, f.test_y)


def test_val_split_accepted(tmp_path):
    root = make_image_folder(tmp_path / "v", splits=("train", "val"))
    assert len(D.load_data(str(root)).test_y) == 18


def test_second_load_comes_from_cache(image_folder, monkeypatch):
    first = D.load_data(str(image_folder))

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(D, "_decode", boom)
    second = D.load_data(str(image_folder))
    assert torch.equal(first.train_x, second.train_x)


def test_cache_invalidated_when_source_changes(image_folder):
    D.load_data(str(image_folder))
    make_image_folder(image_folder, classes=("cat", "dog", "fox", "owl"))
    # a new class folder changes the directory's mtime -> a new cache key
    assert D.load_data(str(image_folder)).num_classes == 4


def test_augmentation_shapes_ranges_and_per_sample_randomness():
    x = torch.randint(1, 256, (16, 3, 6, 6), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    c = D.random_crop(x, 2, g)
    assert c.shape == x.shape and c.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):  # each crop is one window of its own zero-padded image
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(c[i], padded[i, :, dy:dy + 6, dx:dx + 6])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 3  # per-sample randomness, not one offset for the batch
    big = torch.randint(0, 255, (256, 3, 8, 8), dtype=torch.uint8)
    f = D.random_flip(big, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(f[i], big[i].flip(2)) for i in range(256)])
    kept = torch.tensor([torch.equal(f[i], big[i]) for i in range(256)])
    assert (flipped | kept).all() and 0.3 < flipped.float().mean() < 0.7


def test_batches_normalise_and_are_seeded():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(50)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    test = D.Batches(x, y, 20, mean, std)
    xb, yb = next(iter(test))
    assert torch.allclose(xb, (x[:20].float() / 255 - 0.5) / 0.25, atol=1e-5)
    assert len(test) == 3 and xb.dtype == torch.float32
    tr = D.Batches(x, y, 20, mean, std, train=True, crop_padding=2, flip=True, seed=3,
                   drop_last=True)
    a = [b[1] for b in tr]
    assert len(a) == 2 and torch.equal(torch.cat(a), torch.cat([b[1] for b in tr]))
    tr.set_epoch(1)
    assert not torch.equal(torch.cat(a), torch.cat([b[1] for b in tr]))


def test_digits_is_offline_and_fixed():
    s = D.load_data("digits")
    assert s.train_x.shape[1:] == (1, 8, 8) and s.num_classes == 10
    assert len(s.train_y) + len(s.test_y) == 1797
    assert torch.equal(s.test_y, D.load_data("digits").test_y)


@pytest.mark.parametrize("setup, message", [
    (lambda r: make_image_folder(r, splits=("train",)), "holds only train/ .no train/ and"),
    (lambda r: (make_image_folder(r), (r / "train" / "emu").mkdir(),
                (r / "test" / "emu").mkdir()), "has no images"),
    (lambda r: make_image_folder(r, classes=("solo",)), "only one class"),
    (lambda r: (make_image_folder(r), (r / "train" / "cat" / "bad.jpg").write_bytes(b"junk")),
     "cannot decode image train/cat/bad.jpg"),
    (lambda r: (make_image_folder(r), make_image_folder(r, classes=("dog",), size=9,
                                                        splits=("test",))), "different sizes"),
])
def test_bad_folders_raise_one_line_errors(tmp_path, setup, message):
    root = tmp_path / "bad"
    setup(root)
    with pytest.raises(CaprojError, match=message) as e:
        D.load_data(str(root))
    assert "\n" not in str(e.value)


def test_non_image_files_are_ignored(image_folder):
    (image_folder / "train" / "cat" / "notes.txt").write_text("not an image")
    assert len(D.load_data(str(image_folder)).train_y) == 18


def test_bad_specs(tmp_path):
    with pytest.raises(CaprojError, match="data not found"):
        D.load_data(str(tmp_path / "missing"))
    f = tmp_path / "x.csv"
    f.write_text("a,b")
    with pytest.raises(CaprojError, match="unsupported data file"):
        D.load_data(str(f))
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CaprojError, match="cannot read archive"):
        D.load_data(str(bad))


def test_image_size_resizes_mixed_sizes(tmp_path):
    root = make_image_folder(tmp_path / "m")
    make_image_folder(root, classes=("dog",), size=20, splits=("test",), per_class=2)
    s = D.load_data(str(root), image_size=10)
    assert s.train_x.shape[2:] == (10, 10) and s.test_x.shape[2:] == (10, 10)


@needs_cifar
def test_cifar_archive_shapes(cifar):
    assert cifar.train_x.shape == (50000, 3, 32, 32) and cifar.test_x.shape == (10000, 3, 32, 32)
    assert cifar.classes[0] == "airplane" and cifar.classes[-1] == "truck"
    assert torch.bincount(cifar.test_y).tolist() == [1000] * 10


def test_batches_resume_mid_epoch_yields_the_same_remaining_batches():
    x = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(70)
    tr = D.Batches(x, y, 10, (0.5,) * 3, (0.25,) * 3, train=True, crop_padding=2, flip=True,
                   seed=5, drop_last=True)
    tr.set_epoch(2)
    full = list(tr)
    tr.set_epoch(2, start=4)
    rest = list(tr)
    assert len(rest) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(list(tr)) == len(full)  # `start` applies to one iteration only


def test_folder_with_only_val_is_split_into_calibration_and_evaluation(tmp_path):
    make_image_folder(tmp_path / "v", splits=("val",))
    with pytest.raises(CaprojError, match="holds only val/") as e:
        D.load_data(str(tmp_path / "v"))
    assert e.value.param == "split"
    s = D.load_data(str(tmp_path / "v"), split=3)
    n = len(s.train_y) + len(s.test_y)
    assert len(s.train_y) == 3 and s.extra["split"]["evaluation"] == n - 3
    again = D.load_data(str(tmp_path / "v"), split=3)  # seeded: the same images each time
    assert torch.equal(again.train_x, s.train_x) and torch.equal(again.test_y, s.test_y)
    # no image on both sides
    both = torch.cat([s.train_x, s.test_x]).flatten(1)
    assert len({tuple(r.tolist()) for r in both}) == n
    half = D.load_data(str(tmp_path / "v"), split=0.5)
    assert len(half.train_y) == round(n / 2)
