"""Datasets as tensors.

`load_data(spec)` turns a spec into train/test splits of uint8 image tensors (N, C, H, W):
- `digits`: scikit-learn's bundled 8x8 handwritten digits (offline; the demo's default);
- `cifar10`: torchvision's CIFAR10, downloaded into the cache dir;
- a directory in ImageFolder layout with `train/` and `test/` (or `val/`) splits;
- a `.tar.gz`/`.tgz`/`.tar`/`.zip` archive of such a directory, decoded once into the cache;
- unlabeled images: `unlabeled:PATH` (every image below PATH, any layout, labels never read), or
  a folder (archive) with images at its top level and no train/test split. Such Splits have no
  labels (`labelled` is False, `train_y` None) and no test split: jobs are label-free and
  accuracy needs labelled data from elsewhere.

Decoded images are cached as one `.pt` file per source, so a second load is a single read.
`Batches` iterates over tensor-resident data; augmentation (random crop with zero padding and
horizontal flip, fresh randomness per sample) runs on whole batches, not per-sample PIL calls.

Data too big for memory (ImageNet) is streamed instead: `load_data(dir, stream=True)` gives a
`Stream` of two torchvision ImageFolders read by DataLoader workers, ImageNet-style transforms
(RandomResizedCrop + flip for training; resize to 256/224 of the size + center crop for eval),
pinned memory on CUDA. `Batches.train_of`/`test_of` and the calibration subset accept either, so
every job runs on both. A streamed epoch is still a pure function of (seed, epoch): the order
comes from one generator and each image's augmentation from a seed of (seed, epoch, index), so a
resumed run sees the same images as an uninterrupted one whatever the worker count. Under
torchrun each rank reads only its share of every global batch.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from caproj import dist
from caproj.errors import CaprojError
from caproj.stream import IMAGENET_MEAN, IMAGENET_STD, Images, Stream, one_line
from caproj.utils import atomic_save

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
UNLABELED = "unlabeled:"  # data spec prefix: every image below a path, labels never read
CACHE_VERSION = 2


def cache_dir() -> Path:
    d = Path(os.environ.get("CAPROJ_CACHE", Path.home() / ".cache" / "caproj"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class Splits:
    """Train/test images (uint8, N×C×H×W), labels, and how to normalise/augment them."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor | None  # None: unlabeled images (no test split either)
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        return self.train_y is not None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "mean": list(self.mean),
                "std": list(self.std), "train": len(self.train_x), "test": len(self.test_x),
                "labelled": self.labelled}


Data = Splits | Stream  # what jobs take: tensors in memory, or a streamed ImageFolder


# ----------------------------------------------------------------------------- sources
def load_data(spec: str, image_size: int | None = None, stream: bool = False,
              workers: int | None = None, split: int | float | None = None) -> Splits | Stream:
    """Resolve a data spec (see module doc) into Splits, or a Stream of an ImageFolder
    directory with `stream`. A folder with one labelled split (only val/, say) needs `split`:
    that many images (or that fraction) for calibration, the rest for evaluation.
    Raises CaprojError on bad input."""
    if stream:
        if spec.startswith(UNLABELED):
            raise CaprojError("unlabeled images are read into memory (pass image_size=N); "
                              "stream=True reads ImageFolder class folders", param="stream")
        if split is not None:
            raise CaprojError("split=N reads the folder into memory; it does not apply with "
                              "stream=True", param="split")
        return Stream.of(spec, image_size or 224, workers)
    if spec == "digits":
        return _digits()
    if spec == "cifar10":
        return _cifar10()
    unlabeled = spec.startswith(UNLABELED)
    if unlabeled:
        spec = spec[len(UNLABELED):]
        if split is not None:
            raise CaprojError("split=N divides labelled images; unlabeled images have no test "
                              "split to make", param="split")
    p = Path(spec)
    if not p.exists():
        raise CaprojError(f"data not found: {spec!r} (give 'digits', 'cifar10', an ImageFolder "
                          f"directory with train/ and test/, or an archive of one)")
    # labelled data keeps its earlier cache key, so caches decoded before stay valid
    key = (image_size, split, "unlabeled") if unlabeled else (image_size, split)
    if p.is_dir():
        return _cached(p, key,
                       lambda: _read_folder_tree(_FsTree(p), image_size, spec, split, unlabeled))
    if p.name.endswith(ARCHIVE_SUFFIXES):
        return _cached(p, key,
                       lambda: _read_folder_tree(_ArchiveTree(p), image_size, spec, split,
                                                 unlabeled))
    raise CaprojError(f"unsupported data file {spec!r}: expected a directory or one of "
                      f"{', '.join(ARCHIVE_SUFFIXES)}")


def _digits() -> Splits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(0)  # fixed split, independent of the run's seed
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    xf = x[tr].float() / 255
    return Splits("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)],
                  (xf.mean().item(),), (xf.std().item(),), crop_padding=1, flip=False)


def _cifar10() -> Splits:
    import torchvision

    root = cache_dir() / "cifar10"
    try:
        tr = torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        te = torchvision.datasets.CIFAR10(str(root), train=False, download=True)
    except Exception as e:  # URLError, socket errors, checksum failures
        raise CaprojError(f"could not download CIFAR-10 into {root} ({type(e).__name__}: "
                          f"{str(e)[:120]}); offline? pass a local ImageFolder directory or "
                          f"archive as the data spec instead") from None

    def conv(ds: torchvision.datasets.CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.int64))

    (trx, tr_y), (tex, te_y) = conv(tr), conv(te)
    return Splits("cifar10", trx, tr_y, tex, te_y, list(tr.classes), IMAGENET_MEAN, IMAGENET_STD)


def _cached(src: Path, key: tuple, build) -> Splits:
    h = hashlib.sha256(f"{src.resolve()}|{key}|{CACHE_VERSION}".encode())
    # A directory's fingerprint covers every file below it, not just the top folder's mtime.
    for f in sorted(src.rglob("*")) if src.is_dir() else [src]:
        if f.is_file():
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    key = h.hexdigest()[:16]
    f = cache_dir() / "tensors" / f"{src.name.split('.')[0]}-{key}.pt"
    if f.is_file():
        try:
            d = torch.load(f, weights_only=True)
            return Splits(**d)
        except Exception:
            f.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt, never trusted
    splits = build()
    f.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(splits.__dict__, f)
    return splits


class _FsTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = [str(q.relative_to(root)).replace(os.sep, "/")
                      for q in sorted(root.rglob("*")) if q.is_file()]
        self.dirs = {str(q.relative_to(root)).replace(os.sep, "/")
                     for q in root.rglob("*") if q.is_dir()}

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


class _ArchiveTree:
    """Read members straight from a tar/zip: no 60k small files on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._blobs: dict[str, bytes] = {}
        try:
            if path.name.endswith(".zip"):
                with zipfile.ZipFile(path) as z:
                    for info in z.infolist():
                        if not info.is_dir():
                            self._blobs[info.filename] = z.read(info)
            else:
                with tarfile.open(path) as t:
                    for m in t:
                        if m.isfile():
                            fh = t.extractfile(m)
                            if fh is not None:
                                self._blobs[m.name] = fh.read()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            first = str(e).strip().splitlines()[0].rstrip(":") if str(e).strip() else ""
            raise CaprojError(f"cannot read archive {path}: {first or type(e).__name__} "
                              f"(not a tar.gz/tar/zip file, or truncated)") from None
        # Strip a single common top-level folder (e.g. cifar10/train/... -> train/...).
        names = [n.lstrip("./") for n in self._blobs]
        tops = {n.split("/", 1)[0] for n in names}
        strip = len(tops) == 1 and all("/" in n for n in names) and \
            not {"train", "test", "val"} & tops
        self._blobs = {(n.lstrip("./").split("/", 1)[1] if strip else n.lstrip("./")): b
                       for n, b in self._blobs.items()}
        self.files = sorted(self._blobs)
        self.dirs = {"/".join(f.split("/")[:i]) for f in self.files
                     for i in range(1, f.count("/") + 1)}

    def read(self, rel: str) -> bytes:
        return self._blobs[rel]


def _read_folder_tree(tree: _FsTree | _ArchiveTree, image_size: int | None, spec: str,
                      split: int | float | None = None, unlabeled: bool = False) -> Splits:
    flat = any("/" not in f and f.lower().endswith(IMG_EXTENSIONS) for f in tree.files)
    if unlabeled or (flat and not {"train", "test", "val"} & tree.dirs):
        if split is not None:
            raise CaprojError(f"{spec} holds unlabeled images (no class folders): split=N "
                              f"divides labelled images only", param="split")
        return _unlabeled(tree, image_size, spec)
    test_name = "test" if "test" in tree.dirs else "val" if "val" in tree.dirs else None
    if "train" not in tree.dirs or test_name is None:
        return _one_split(tree, image_size, spec, split)
    if split is not None:
        raise CaprojError(f"{spec} has train/ and {test_name}/ already; split=N is for a "
                          f"folder with only one of them", param="split")
    classes = _classes(tree, "train/", spec)
    test_classes = sorted(d.split("/")[1] for d in tree.dirs
                          if d.startswith(f"{test_name}/") and d.count("/") == 1)
    if test_classes != classes:
        extra = sorted(set(test_classes) ^ set(classes))
        raise CaprojError(f"{spec}: class folders of train/ and {test_name}/ differ: {extra[:5]}")
    trx, tr_y = _read_split(tree, "train/", classes, image_size, spec)
    tex, te_y = _read_split(tree, f"{test_name}/", classes, image_size, spec)
    if trx.shape[1:] != tex.shape[1:]:
        raise CaprojError(f"{spec}: train images are {tuple(trx.shape[1:])}, "
                          f"{test_name} images {tuple(tex.shape[1:])}; pass image_size=N")
    return _splits(spec, trx, tr_y, tex, te_y, classes)


def _classes(tree: _FsTree | _ArchiveTree, prefix: str, spec: str) -> list[str]:
    depth = prefix.count("/")
    classes = sorted(d.split("/")[depth] for d in tree.dirs if d.startswith(prefix) and
                     d.count("/") == depth)
    where = prefix or "the top level"
    if not classes:
        raise CaprojError(f"{spec}: {where} has no class folders")
    if len(classes) < 2:
        raise CaprojError(f"{spec}: {where} has only one class ({classes[0]!r}); "
                          f"classification needs at least two")
    return classes


def _read_split(tree: _FsTree | _ArchiveTree, prefix: str, classes: list[str],
                image_size: int | None, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for ci, c in enumerate(classes):
        files = [f for f in tree.files if f.startswith(f"{prefix}{c}/")
                 and f.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            raise CaprojError(f"{spec}: class folder {prefix}{c}/ has no images")
        for f in files:
            xs.append(_decode(tree.read(f), f, image_size))
            ys.append(ci)
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise CaprojError(f"{spec}: images in {prefix or './'} have different sizes "
                          f"({sorted(shapes)[:3]}...); pass image_size=N to resize, "
                          f"or stream=True for data too big for memory")
    return (torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(ys, dtype=torch.int64))


def _one_split(tree: _FsTree | _ArchiveTree, image_size: int | None, spec: str,
               split: int | float | None) -> Splits:
    """A folder with a single labelled split (only val/, only test/, only train/, or class
    folders at the top): divided by a seeded shuffle into `split` images (or that fraction)
    for calibration/training and the rest for evaluation."""
    tops = sorted(d for d in tree.dirs if "/" not in d)
    only = [t for t in ("train", "val", "test") if t in tops]
    prefix = f"{only[0]}/" if len(only) == 1 else "" if tops and not only else None
    if prefix is None:
        raise CaprojError(f"{spec}: expected ImageFolder splits train/ and test/ (or val/), "
                          f"found top-level: {tops[:8]}")
    name = prefix or "class folders only"
    if split is None:
        raise CaprojError(f"{spec} holds only {name} (no train/ and test/ pair): pass "
                          f"split=N to calibrate on N of its images (a seeded shuffle) and "
                          f"evaluate on the rest", param="split")
    classes = _classes(tree, prefix, spec)
    x, y = _read_split(tree, prefix, classes, image_size, spec)
    n = len(y)
    k = int(round(split * n)) if isinstance(split, float) and split < 1 else int(split)
    if not (isinstance(split, (int, float)) and 0 < k < n):
        raise CaprojError(f"split=N must leave images on both sides of {n}, got {split}",
                          param="split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    a, b = order[:k].sort().values, order[k:].sort().values
    out = _splits(spec, x[a], y[a], x[b], y[b], classes)
    out.extra["split"] = {"from": name, "calibration": k, "evaluation": n - k, "seed": 0}
    return out


def _unlabeled(tree: _FsTree | _ArchiveTree, image_size: int | None, spec: str) -> Splits:
    """Every image below the root, in path order, without labels and without a test split."""
    files = [f for f in tree.files if f.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise CaprojError(f"{spec}: no images found (looked for {', '.join(IMG_EXTENSIONS)})")
    xs = [_decode(tree.read(f), f, image_size) for f in files]
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise CaprojError(f"{spec}: images have different sizes ({sorted(shapes)[:3]}...); "
                          f"pass image_size=N to resize")
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    out = _splits(spec, x, None, x[:0], None, [])
    out.extra["unlabeled"] = len(files)
    return out


def _splits(spec: str, trx: torch.Tensor, tr_y: torch.Tensor | None, tex: torch.Tensor,
            te_y: torch.Tensor | None, classes: list[str]) -> Splits:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if trx.shape[1] == 3 else ((0.5,), (0.5,))
    pad = 4 if trx.shape[-1] <= 64 else 0  # CIFAR-style crop padding for small images
    return Splits(Path(spec).name, trx, tr_y, tex, te_y, classes, mean, std, crop_padding=pad)


def _decode(blob: bytes, name: str, image_size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("RGB")
            if image_size is not None:
                # ImageNet-sized crops come from the centre 87.5 % (torchvision's eval
                # transform: resize 256, crop 224); small ones from the whole short side
                short = round(image_size / 0.875) if image_size >= 128 else image_size
                w, h = im.size
                s = short / min(w, h)
                im = im.resize((max(short, round(w * s)), max(short, round(h * s))),
                               Image.BILINEAR)
                w, h = im.size
                left, top = (w - image_size) // 2, (h - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise CaprojError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- batches
def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch, as one gather (x: N×C×H×W, any dtype)."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    ni = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[ni, ci, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(mask, x.flip(3), x)


class Batches:
    """Iterate (images float32 normalised, labels) over tensor-resident data; bare images when
    there are no labels (`y` None: label-free jobs). `mean`/`std` None: the images are already
    float model inputs (synthetic images) and are passed through as they are.

    Shuffling and augmentation draw from a generator seeded with (seed, epoch), so an epoch's
    batches are a pure function of the seed and the epoch number (what resume relies on).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, mean, std, *,
                 train: bool = False, crop_padding: int = 0, flip: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", drop_last: bool = False,
                 channels_last: bool = False) -> None:
        self._setup(len(x), batch_size, mean, std, train, seed, device, drop_last,
                    channels_last)
        self.x = x.to(self.device)
        self.y = y.to(self.device) if y is not None else None
        self.crop_padding, self.flip = crop_padding, flip

    def _setup(self, n: int, batch_size: int, mean, std, train: bool, seed: int,
               device: torch.device | str, drop_last: bool, channels_last: bool) -> None:
        """What every batch source shares: checks, schedule state, normalisation."""
        if n == 0:
            raise CaprojError("dataset split is empty")
        if batch_size < 1:
            raise CaprojError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.drop_last = drop_last and n >= batch_size
        self.channels_last = channels_last
        self.epoch, self.start = 0, 0
        shape = (1, -1, 1, 1)
        self.mean = self.std = None
        if mean is not None:
            self.mean = torch.tensor(mean, device=self.device).view(shape) * 255
            self.std = torch.tensor(std, device=self.device).view(shape) * 255

    sharded = False  # batches hold the global batch; torchrun callers take their share

    @classmethod
    def train_of(cls, s: Splits | Stream, batch_size: int, **kw) -> Batches | StreamBatches:
        """Shuffled, augmented training batches (a Stream's are already this rank's share)."""
        if isinstance(s, Stream):
            return StreamBatches(s, s.train_samples, batch_size, train=True, drop_last=True,
                                 shard=True, **kw)
        return cls(s.train_x, s.train_y, batch_size, s.mean, s.std, train=True,
                   crop_padding=s.crop_padding, flip=s.flip, drop_last=True, **kw)

    @classmethod
    def test_of(cls, s: Splits | Stream, batch_size: int = 500, **kw) -> Batches | StreamBatches:
        if isinstance(s, Splits) and not s.labelled:
            raise CaprojError(f"{s.name} holds unlabeled images: measuring accuracy needs "
                              f"labelled data (an ImageFolder with class folders)",
                              param="eval_data")
        if isinstance(s, Stream):
            return StreamBatches(s, s.test_samples, batch_size, **kw)
        return cls(s.test_x, s.test_y, batch_size, s.mean, s.std, **kw)

    @classmethod
    def subset_of(cls, s: Splits | Stream, n: int, batch_size: int, seed: int = 0,
                  **kw) -> Batches | StreamBatches:
        """A fixed random subset of n training images, unaugmented (calibration data)."""
        g = torch.Generator().manual_seed(seed)
        n_train = len(s.train_samples) if isinstance(s, Stream) else len(s.train_x)
        idx = torch.randperm(n_train, generator=g)[:min(n, n_train)]
        if isinstance(s, Stream):
            return StreamBatches(s, [s.train_samples[i] for i in idx.tolist()], batch_size, **kw)
        return cls(s.train_x[idx], s.train_y[idx] if s.train_y is not None else None, batch_size,
                   s.mean, s.std, **kw)

    def __len__(self) -> int:
        n = self.n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields this epoch's batches from index `start` on (resume)."""
        self.epoch, self.start = epoch, start

    def normalise(self, xb: torch.Tensor) -> torch.Tensor:
        out = (xb.float() - self.mean) / self.std if self.mean is not None else xb
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).to(self.device) if self.train else None
        start, self.start = self.start, 0
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if i < start:  # skipped (resume): draw the same random numbers, touch no images
                if order is not None:
                    m = len(order[sl])
                    if self.crop_padding > 0:  # as random_crop: dy, then dx
                        for _ in range(2):
                            torch.randint(0, 2 * self.crop_padding + 1, (m,), generator=gen)
                    if self.flip:
                        torch.rand(m, generator=gen)
                continue
            idx = sl if order is None else order[sl]
            xb = self.x[idx]
            if order is not None:
                xb = random_crop(xb, self.crop_padding, gen)
                if self.flip:
                    xb = random_flip(xb, gen)
            if self.y is None:
                yield self.normalise(xb)
            else:
                yield self.normalise(xb), self.y[idx]


class StreamBatches(Batches):
    """Batches of a Stream: the same interface, images decoded by DataLoader workers."""

    def __init__(self, stream: Stream, samples: list[tuple[str, int]], batch_size: int, *,
                 train: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                 drop_last: bool = False, channels_last: bool = False,
                 shard: bool = False) -> None:
        self._setup(len(samples), batch_size, stream.mean, stream.std, train, seed, device,
                    drop_last, channels_last)
        self.images = Images(samples, stream.transform(train), seed)
        self.workers = stream.workers
        self.sharded = shard and dist.world() > 1  # callers must not shard again

    def index_batches(self) -> list[list[int]]:
        """This epoch's batches of sample indices, from `start` on, this rank's share."""
        n = len(self.images)
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        out = [order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
               for i in range(self.start, len(self))]
        if self.sharded:
            out = [b[dist.rank()::dist.world()] for b in out]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.index_batches()
        self.start = 0
        self.images.epoch = self.epoch  # workers copy the dataset when the iterator starts
        loader = torch.utils.data.DataLoader(
            self.images, batch_sampler=batches, num_workers=self.workers,
            pin_memory=self.device.type == "cuda")
        it = iter(loader)
        while True:
            try:
                xb, yb = next(it)
            except StopIteration:
                return
            except CaprojError as e:
                raise CaprojError(one_line(e)) from None
            yield (self.normalise(xb.to(self.device, non_blocking=True)),
                   yb.to(self.device, non_blocking=True))
