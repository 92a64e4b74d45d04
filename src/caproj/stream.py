"""Streamed ImageFolder data, for datasets too big to decode into memory (ImageNet).

`Stream` holds two torchvision ImageFolders (train/ and val/ or test/); `data.StreamBatches` reads
them with DataLoader workers and yields the same (normalised float images, labels) batches as
`data.Batches`, so training, calibration and CaP optimisation run unchanged on either.

- Transforms are the ImageNet recipe from torchvision's reference scripts: RandomResizedCrop +
  horizontal flip for training, resize to 256/224 of the size + center crop for evaluation.
  Workers return uint8 tensors; normalisation runs on the device, on the whole batch.
- Determinism: the epoch's order comes from a generator seeded with (seed, epoch) and each
  image's augmentation from a seed of (seed, epoch, index), so batches do not depend on the
  worker count and a resumed epoch skips its first batches without reading them.
- torchrun: each rank reads only its slice of every global batch (what a DistributedSampler
  does, but batch-aligned, so the global batch is the same as in one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from caproj.errors import CaprojError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass
class Stream:
    """An ImageFolder tree read lazily; quacks like `data.Splits` where jobs need it to."""

    name: str
    classes: list[str]
    train_samples: list[tuple[str, int]]
    test_samples: list[tuple[str, int]]
    image_size: int = 224
    workers: int = field(default_factory=default_workers)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def of(cls, spec: str, image_size: int = 224, workers: int | None = None) -> Stream:
        from torchvision.datasets import ImageFolder

        root = Path(spec)
        if not root.is_dir():
            raise CaprojError(f"stream=True reads an ImageFolder directory with train/ and val/ "
                              f"(or test/); {spec!r} is not a directory")
        test = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if not (root / "train").is_dir() or test is None:
            raise CaprojError(f"{spec}: expected ImageFolder splits train/ and val/ (or test/)")
        sets = []
        for d in (root / "train", test):
            try:
                sets.append(ImageFolder(str(d)))
            except (FileNotFoundError, RuntimeError) as e:
                raise CaprojError(f"{d}: {str(e).splitlines()[0]}") from None
        tr, te = sets
        if len(tr.classes) < 2:
            raise CaprojError(f"{spec}: train/ has {len(tr.classes)} class folder(s); "
                              f"classification needs at least two")
        if tr.classes != te.classes:
            extra = sorted(set(tr.classes) ^ set(te.classes))
            raise CaprojError(f"{spec}: class folders of train/ and {test.name}/ differ: "
                              f"{extra[:5]}")
        return cls(root.name, tr.classes, tr.samples, te.samples, image_size,
                   default_workers() if workers is None else workers)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "mean": list(self.mean),
                "std": list(self.std), "train": len(self.train_samples),
                "test": len(self.test_samples), "stream": True, "image_size": self.image_size}

    def transform(self, train: bool):
        from torchvision.transforms import v2

        s = self.image_size
        if train:
            return v2.Compose([v2.RandomResizedCrop(s, antialias=True),
                               v2.RandomHorizontalFlip(), v2.PILToTensor()])
        return v2.Compose([v2.Resize(round(s * 256 / 224), antialias=True), v2.CenterCrop(s),
                           v2.PILToTensor()])


class Images(torch.utils.data.Dataset):
    """Decodes one image and applies the transform under a per-(seed, epoch, index) seed."""

    def __init__(self, samples: list[tuple[str, int]], transform, seed: int) -> None:
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, y = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise CaprojError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            return self.transform(img), y


def one_line(e: Exception) -> str:
    """A worker's exception arrives wrapped with its traceback; keep the original message."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return last.split(": ", 1)[1] if last.startswith("caproj.errors.CaprojError: ") else last
