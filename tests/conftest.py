"""Shared fixtures. Real data and weights live in ../shared (never committed); tests that need
them skip with a clear reason when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
MODELS = SHARED / "models"

needs_cifar = pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(),
                                 reason=f"needs the CIFAR-10 JPEG archive at {CIFAR_ARCHIVE}")
needs_models = pytest.mark.skipif(not MODELS.is_dir(),
                                  reason=f"needs the pretrained CIFAR ResNets in {MODELS}")


WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest -n N


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    # One cache for the run (so CIFAR is decoded once, also across pytest -n workers), never
    # the user's home cache. The cores are shared out: N workers, cores / N threads each (the
    # CLI subprocesses too), so no worker's OpenMP threads spin against another's.
    root = tmp_path_factory.getbasetemp()
    root = root.parent if WORKERS > 1 else root
    (root / "caproj-cache").mkdir(exist_ok=True)
    os.environ.setdefault("CAPROJ_CACHE", str(root / "caproj-cache"))
    threads = max(1, min(2, os.cpu_count() or 1) // WORKERS)
    torch.set_num_threads(threads)
    if WORKERS > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6,
                      size: int = 12, splits=("train", "test"), seed: int = 0) -> Path:
    """A tiny ImageFolder tree of PNGs whose pixels encode class and index."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                arr[0, 0] = (ci * 40, i, 7)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def cifar():
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"needs the CIFAR-10 JPEG archive at {CIFAR_ARCHIVE}")
    from caproj.data import load_data

    return load_data(str(CIFAR_ARCHIVE))


def caproj(*args, cwd=None, timeout=600):
    """Run the CLI as a user does; returns the CompletedProcess."""
    return subprocess.run(caproj_cmd(*args), capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def caproj_in_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """The CLI's `main` in this process (no interpreter and torch start-up per call): for the
    many short runs that check messages and exit codes; `caproj` runs it as users do."""
    import contextlib
    import io

    from caproj.cli import main

    out, err = io.StringIO(), io.StringIO()
    old, threads = os.getcwd(), torch.get_num_threads()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as PYTHONWARNINGS=ignore does for `caproj`
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def caproj_cmd(*args) -> list[str]:
    exe = shutil.which("caproj")
    return ([exe] if exe else [sys.executable, "-m", "caproj.cli"]) + [str(a) for a in args]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A digits-cnn trained by the CLI (the demo's model), shared by the CLI tests."""
    out = tmp_path_factory.mktemp("train") / "digits.pt"
    r = caproj("train", "--arch", "digits-cnn", "--data", "digits", "--epochs", "3",
               "--lr", "0.05", "--batch-size", "64", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def loaders(splits, batch_size: int = 128, calib_images: int = 2000, seed: int = 0):
    """caproj's own data as the library's iterables (what the CLI passes): augmented training
    batches, an unaugmented calibration subset, test batches."""
    from caproj.data import Batches

    return (Batches.train_of(splits, batch_size, seed=seed),
            Batches.subset_of(splits, calib_images, 250, seed=seed),
            Batches.test_of(splits, 500))


def make_cap(model, sites, widths, cfg, shape):
    """A staged CaP over explicit sites and widths (what the method plug-ins build)."""
    from caproj.cap import CaP

    return CaP(model, torch.zeros(1, *shape), sites=sites, widths=widths, config=cfg)


def run_cap(model, sites, widths, cfg, splits):
    """CaP end to end on caproj's own data, as the CLI runs it."""
    train, calib, _ = loaders(splits, cfg.batch_size, cfg.calib_images, cfg.seed)
    cap = make_cap(model, sites, widths, cfg, splits.input_shape)
    return cap, cap.run(train, calib)
