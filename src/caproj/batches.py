"""Any iterable of batches, as caproj's loops read it.

A user's data is whatever they already feed their model: a `torch.utils.data.DataLoader` (or any
re-iterable object) yielding `(x, y)`, `(x,)`, `(x, y, anything...)`, a bare tensor `x`, or a
dict (Hugging Face style: `{"pixel_values": x, "labels": y}`; "image" / "label" too, other keys
through `Keyed` or compress's `input_key=` / `target_key=`). A generator or other one-shot
iterator is refused: caproj reads its data more than once.
caproj adds no normalisation and no augmentation of its own. Batches without labels make the
job label-free (distillation from the original model only).

- `split` turns one batch into `(x, y or None)` on a device;
- `rebatch` regroups a pass into batches of exactly `size` images (CaP's optimisation runs at a
  fixed batch; a short tail is dropped unless the whole pass is shorter than one batch);
- `take` collects the first `n` images (calibration), `fit_chunks` splits them so that
  no activation of one batch grows past `CHUNK_BYTES`;
- `endless` runs pass after pass, calling the data's `set_epoch(epoch)` (or its sampler's, as
  `DistributedSampler` wants) before each, and skips the first batches of a resumed pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from caproj.errors import CaprojError

Batch = tuple[torch.Tensor, torch.Tensor | None]
INPUT_KEYS = ("pixel_values", "image")  # what a dict batch's inputs are looked up by, in order
TARGET_KEYS = ("labels", "label")


def _from_dict(batch: Mapping, input_keys: tuple[str, ...], target_keys: tuple[str, ...]
               ) -> tuple[Any, Any]:
    x = next((batch[k] for k in input_keys if k in batch), None)
    if not isinstance(x, torch.Tensor):
        keys = " or ".join(map(repr, input_keys))
        raise CaprojError(f"a dict batch needs its inputs under {keys}; it has keys "
                          f"{sorted(map(str, batch))} (pass input_key=...)", param="input_key")
    return x, next((batch[k] for k in target_keys if k in batch), None)


def split(batch: Any, device: torch.device | None = None) -> Batch:
    """(x, y or None) of one batch, moved to `device`."""
    if isinstance(batch, Mapping):
        batch = _from_dict(batch, INPUT_KEYS, TARGET_KEYS)
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        x = batch[0]
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    else:
        raise CaprojError(f"data must yield tensors x, (x,) or (x, y) tuples or dicts; got a "
                          f"batch of type {type(batch).__name__}", param="data")
    if device is not None:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True) if y is not None else None
    return x, y


def check_iterable(data: Any, name: str = "data", reread: bool = True) -> None:
    """`data` is an iterable of batches (`reread`: one that can be read more than once)."""
    if data is None or isinstance(data, (torch.Tensor, str, bytes)) or \
            not isinstance(data, Iterable):
        raise CaprojError(f"{name} must be an iterable of batches (a DataLoader, a list of "
                          f"(x, y) tuples, ...), got {type(data).__name__}", param=name)
    if reread and isinstance(data, Iterator):  # iter(it) is it: the first pass would use it up
        raise CaprojError(f"{name} must be re-iterable (a DataLoader, a list of batches, ...): "
                          f"a {type(data).__name__} is used up by its first pass and caproj "
                          f"reads the data more than once; pass list({name}) if it fits in "
                          f"memory", param=name)


class Keyed:
    """Dict batches read by the keys given (`input_key`, `target_key`; None: the defaults,
    INPUT_KEYS / TARGET_KEYS). Everything else (len, set_epoch, sampler) is the wrapped
    object's."""

    def __init__(self, data: Iterable, input_key: str | None = None,
                 target_key: str | None = None) -> None:
        check_iterable(data)
        self.data = data
        self.keys = ((input_key,) if input_key else INPUT_KEYS,
                     (target_key,) if target_key else TARGET_KEYS)

    def __iter__(self) -> Iterator[Any]:
        for b in self.data:
            yield _from_dict(b, *self.keys) if isinstance(b, Mapping) else b

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("data", "keys"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)


def keyed(data: Any, input_key: str | None, target_key: str | None) -> Any:
    """`data` read with these dict keys (unchanged when neither is given or it is None)."""
    return data if data is None or (input_key is None and target_key is None) else \
        Keyed(data, input_key, target_key)


def iterate(data: Iterable, device: torch.device | None = None, reread: bool = True
            ) -> Iterator[Batch]:
    check_iterable(data, reread=reread)
    for b in data:
        yield split(b, device)


class WithoutLabels:
    """`data` with its labels dropped: a labelled loader (an ImageFolder, say) used label-free.
    Everything else (len, batch_size, set_epoch, sampler, sharded) is the wrapped object's."""

    def __init__(self, data: Iterable) -> None:
        check_iterable(data)
        self.data = data

    def __iter__(self) -> Iterator[torch.Tensor]:
        for x, _ in iterate(self.data):
            yield x

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "data":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)


def rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Batches of exactly `size` images, concatenating or splitting the given ones."""
    if size < 1:
        raise CaprojError(f"batch_size must be >= 1, got {size}")
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor | None] = []
    n, yielded = 0, False
    for x, y in batches:
        if not xs and len(x) == size:  # the common case: nothing to regroup
            yield x, y
            yielded = True
            continue
        xs.append(x)
        ys.append(y)
        n += len(x)
        while n >= size:
            cx = torch.cat(xs)
            cy = torch.cat(ys) if all(v is not None for v in ys) else None  # type: ignore[misc]
            yield cx[:size], (cy[:size] if cy is not None else None)
            yielded = True
            rest = cx[size:]
            xs = [rest] if len(rest) else []
            ys = [cy[size:]] if cy is not None and len(rest) else ([None] if len(rest) else [])
            n = len(rest)
    if xs and not yielded:  # a pass shorter than one batch: use what there is
        cy = torch.cat(ys) if all(v is not None for v in ys) else None  # type: ignore[misc]
        yield torch.cat(xs), cy


def take(data: Iterable, n: int, device: torch.device | None = None,
         chunk: int = 250) -> list[torch.Tensor]:
    """The inputs of the first `n` images of one pass, in batches of at most `chunk`."""
    out: list[torch.Tensor] = []
    got = 0
    for x, _ in rebatch(iterate(data, device), chunk):
        x = x[: n - got]
        out.append(x)
        got += len(x)
        if got >= n:
            break
    if not out:
        raise CaprojError("data is empty: it yielded no batch", param="data")
    return out


CHUNK_BYTES = 256 << 20  # the largest activation one calibration batch may make


@torch.no_grad()
def fit_chunks(model: torch.nn.Module, xs: list[torch.Tensor],
               max_bytes: int = CHUNK_BYTES) -> list[torch.Tensor]:
    """`xs` (`take`'s batches) re-split so that no module's output for one batch exceeds
    `max_bytes`. On the CPU a tensor above glibc's mmap threshold (1 GiB with
    `utils.steady_allocator`) is mapped from the OS and faulted in anew on every forward:
    MobileNetV2 at 224 x 224 in batches of 250 makes 1.2 GB in its first expansion, and its
    automatic allocation spent 70 % of its time in the kernel. One image's forward sizes it."""
    if not xs:
        return xs
    largest = [1]

    def hook(m: torch.nn.Module, i: Any, o: Any) -> None:
        if isinstance(o, torch.Tensor):
            largest[0] = max(largest[0], o.numel() * o.element_size())

    was = model.training
    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if next(m.children(), None) is None]
    try:
        model.eval()
        model(xs[0][:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    size = max(1, max_bytes // largest[0])
    if all(len(x) <= size for x in xs):
        return xs
    return [c for x in xs for c in x.split(size)]


def set_epoch(data: Any, epoch: int, start: int = 0) -> int:
    """Tell `data` which pass comes next. Returns how many leading batches it will skip by
    itself (caproj's own batch sources can skip without reading; others skip nothing)."""
    fn = getattr(data, "set_epoch", None)
    if fn is None:
        sampler = getattr(data, "sampler", None) or getattr(data, "batch_sampler", None)
        fn = getattr(sampler, "set_epoch", None)
        if fn is not None:
            fn(epoch)
        return 0
    try:
        takes_start = len(inspect.signature(fn).parameters) >= 2
    except (TypeError, ValueError):
        takes_start = False
    if takes_start:
        fn(epoch, start)
        return start
    fn(epoch)
    return 0


def steps_per_pass(data: Any, size: int | None = None) -> int | None:
    """Batches in one pass (after rebatching to `size`), if the data knows its length."""
    try:
        n = len(data)
    except TypeError:
        return None
    own = getattr(data, "batch_size", None)
    if size is None or own == size:
        return n
    ds = getattr(data, "dataset", None)
    try:
        images = len(ds) if ds is not None else None
    except TypeError:
        images = None
    return max(1, images // size) if images else None


def endless(data: Iterable, size: int | None, device: torch.device | None = None,
            start: int = 0) -> Iterator[Batch]:
    """Batches forever, pass after pass, from the `start`-th (of the rebatched stream)."""
    check_iterable(data)
    per = steps_per_pass(data, size)
    epoch, skip = divmod(start, per) if per else (0, start)
    while True:
        own = size is None or getattr(data, "batch_size", None) == size
        skip -= set_epoch(data, epoch, skip) if own else set_epoch(data, epoch)
        it = iterate(data, device)
        seen = 0
        for b in rebatch(it, size) if size is not None else it:
            seen += 1
            if skip > 0:
                skip -= 1
                continue
            yield b
        if seen == 0 and skip == 0:
            raise CaprojError("data is empty: it yielded no batch", param="data")
        epoch += 1
        if per:
            skip = 0
