"""Small shared helpers: seeding, devices, atomic file writes, run records."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import random
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from caproj.errors import CaprojError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CaprojError(f"unknown device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CaprojError(f"device {name!r} requested but CUDA is not available")
    return dev


def local_device(dev: torch.device) -> torch.device:
    """`cuda` without an index means this process's GPU (torchrun's LOCAL_RANK)."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def check_output_path(path: str | os.PathLike) -> Path:
    """Validate early that `path` can be written, before any long work starts."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CaprojError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise CaprojError(f"output directory is not writable: {parent}")
    if p.is_dir():
        raise CaprojError(f"output path is a directory: {p}")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temp file path in `path`'s directory; renamed to `path` if the block succeeds, removed
    otherwise: never a half-written (or unchecked) output file."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file private (0600); the output gets the usual mode (umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode(), path)


@torch.no_grad()
def run_with_hooks(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                   hooks: list[Any]) -> None:
    """Forward every batch in eval mode, then remove the (already registered) hooks."""
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()


def run_record(seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """What every output carries: seed, versions, command line, machine."""
    from caproj.version import __version__

    return {
        "caproj_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "command": " ".join(sys.argv),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        **extra,
    }


_STEADY: bool | None = None  # steady_allocator's outcome in this process
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def steady_allocator() -> bool:
    """Make CPU tensor memory come back from the heap instead of the OS, for this process.

    PyTorch's CPU allocator is glibc's malloc. By default glibc maps large blocks (above a
    threshold it moves as blocks are freed) straight from the OS and unmaps them on free, and it
    trims the heap, so a batch-64 forward can fault in every activation again: ResNet-56 in
    inductor took 5,700-7,600 page faults per forward (44-49 ms against 36-39 ms) and, as the
    threshold moved, switched between speeds whose ratio to a narrowed network differed by up
    to 20 % (benchmarks/allocator.py). Fixing both thresholds (1 GiB mmap, 1 GiB trim) keeps
    freed memory for reuse, as jemalloc or tcmalloc deployments do: no faults per forward, one
    steady speed. The process keeps its peak heap instead of returning it. No-op (False) off
    glibc; idempotent."""
    global _STEADY
    if _STEADY is None:
        _STEADY = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _STEADY = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
                               or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
                _STEADY = _STEADY and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
            except (OSError, AttributeError):
                _STEADY = False
            if _STEADY:
                log.info("glibc malloc: mmap and trim thresholds fixed (steady_allocator)")
    return _STEADY


def check_input_shape(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run `model` once on zeros of `input_shape` (batch 1, eval mode, no grad) and turn a
    failure into one line naming the shape: a model that cannot take the input size is refused
    before any work, not in the middle of it."""
    p = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else None)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CaprojError(f"{type(model).__name__} cannot run on inputs of shape "
                          f"{tuple(input_shape)}: {type(e).__name__}: {first}",
                          param="example_inputs") from None
    finally:
        model.train(was)


def available_memory(device: torch.device) -> int:
    """Bytes a computation can still take on `device`: free GPU memory, or the kernel's
    MemAvailable on Linux (8 GiB assumed where neither can be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def unwrap(model: Any) -> Any:
    """The plain module inside `torch.compile` (its `_orig_mod`), `DataParallel` and
    `DistributedDataParallel` (`.module`) wrappers; anything else as it is."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
