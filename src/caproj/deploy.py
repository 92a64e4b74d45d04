"""Inference-time forms of a model, for latency measured the way it would be deployed.

Thin layers are overhead-bound at batch 1: in eager PyTorch every conv, BN, ReLU and add is a
separate dispatch. The forms, each applied alike to original and compressed models before they
are compared (benchmarks/latency.py measures them all):
- `eager`: the module as it is;
- `fold_bn`: BatchNorms folded into the convs (torch.fx conv-bn fusion);
- `fold_bn_cl`: the same, run channels_last (oneDNN's fast layout on CPU);
- `freeze`: BN folded, traced and frozen with TorchScript (fused conv+ReLU);
- `inductor`: BN folded, channels_last, compiled by torch.compile (inductor, weights frozen as
  constants, so convs take prepacked weights and fused ReLU/add epilogues): the batch-64 winner
  on this machine, at a few seconds of compilation per model and batch size;
- `onnxruntime`: BN folded, exported to ONNX and run by onnxruntime, whose per-op overhead is a
  fraction of eager PyTorch's (the batch-1 winner on this machine).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caproj import metrics
from caproj.errors import CaprojError

log = logging.getLogger(__name__)

FORMS = ("eager", "fold_bn", "fold_bn_cl", "freeze", "inductor", "onnxruntime")
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors", "pt2")


def fold_bn(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def freeze(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    m = fold_bn(model)
    x = torch.zeros(1, *input_shape, device=next(m.parameters()).device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, x)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def compiled(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1,
             channels_last_input: bool = False) -> nn.Module:
    """`fold_bn_cl` compiled by inductor with frozen weights (under no_grad/inference_mode, as
    inference runs; one compilation per input shape and layout). Compiles once here on a probe
    batch of `batch`, so a missing C++ toolchain is reported now, as a CaprojError, not at the
    first real call. `channels_last_input`: the probe (and so the inputs compiled for) is
    channels_last rather than contiguous; feeding the other layout compiles a second time."""
    m = ChannelsLast(fold_bn(model))
    c = torch.compile(m, dynamic=False, options={"freezing": True})
    x = torch.zeros(batch, *input_shape, device=next(m.parameters()).device)
    if channels_last_input and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            c(x)
    except Exception as e:  # inductor wraps toolchain failures in many exception types
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # dynamo wraps the cause as "backend='inductor' raised:\n<the cause>"
        cause = [ln for ln in lines if not ln.endswith("raised:")]
        first = (cause or lines or [type(e).__name__])[0]
        raise CaprojError(f"inference form 'inductor' unavailable here: {first}") from None
    return c


class ChannelsLast(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # images; other inputs (a linear layer's tokens) as they are
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | None = None,
                opset: int = 17) -> bytes:
    """ONNX bytes of `model` (BN folded, dynamic batch), checked by onnx.checker; also written
    atomically to `path` if given."""
    import io

    try:
        import onnx
    except ImportError:
        raise CaprojError("ONNX export needs onnx: pip install -e '.[export]'") from None
    m = fold_bn(model).cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.zeros(1, *input_shape),), buf, dynamo=False,
                          input_names=["input"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    if path is not None:
        from caproj.utils import atomic_write_bytes

        atomic_write_bytes(data, path)
    return data


class OnnxRuntimeModule(nn.Module):
    """Runs an ONNX export in onnxruntime behind a torch-style forward (CPU tensors)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...],
                 threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise CaprojError("onnxruntime is not installed: pip install -e '.[export]'") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(export_onnx(model, input_shape), so,
                                            providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"input": x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


def for_inference(model: nn.Module, form: str, input_shape: tuple[int, ...], batch: int = 1,
                  threads: int | None = None, channels_last_input: bool = False) -> nn.Module:
    """`model` in an inference form; `batch`: the batch inductor compiles for, `threads`:
    onnxruntime's intra-op threads (default torch's), `channels_last_input`: the layout
    inductor compiles for (`compiled`)."""
    if form == "eager":
        return model.eval()
    if form == "fold_bn":
        return fold_bn(model)
    if form == "fold_bn_cl":
        return ChannelsLast(fold_bn(model))
    if form == "freeze":
        return freeze(model, input_shape)
    if form == "inductor":
        return compiled(model, input_shape, batch, channels_last_input)
    if form == "onnxruntime":
        return OnnxRuntimeModule(model, input_shape, threads)
    raise CaprojError(f"unknown inference form {form!r}; choose one of {', '.join(FORMS)}")


# ----------------------------------------------------------------------------- export
def export(model: nn.Module, fmt: str, path: str | os.PathLike, input_shape: tuple[int, ...],
           meta: dict[str, Any] | None = None) -> float:
    """Write `model` as `fmt`, reload what was written and compare it with PyTorch on random
    inputs (batch 2, so a batch-1 trace that froze the batch size fails here); the file appears
    at `path` only if the outputs agree (max abs diff <= 1e-4 relative). Returns the diff.

    - onnx: BN folded, standard opset-17 ops, dynamic batch, checked by onnx.checker, run back
      in onnxruntime;
    - torchscript: BN folded, traced and frozen (`torch.jit.load` it, no caproj needed);
    - safetensors: the weights, with caproj's metadata (architecture, widths via the shapes) in
      the header, so `caproj eval --weights model.safetensors` rebuilds the compressed model;
    - pt2: a torch.export program with a dynamic batch dimension.
    """
    from caproj.utils import atomic_path

    if fmt not in EXPORT_FORMATS:
        raise CaprojError(f"unknown export format {fmt!r}; choose one of "
                          f"{', '.join(EXPORT_FORMATS)}")
    model = model.cpu().eval()
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    with atomic_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _WRITERS[fmt](model, input_shape, tmp, meta or {}, x)
        diff = (got - ref).abs().max().item()
        if diff > 1e-4 * max(1.0, ref.abs().max().item()):
            raise CaprojError(f"exported {fmt} model differs from PyTorch by {diff:.3g}; "
                              f"nothing written")
    return diff


def _onnx(model, shape, tmp, meta, x) -> torch.Tensor:
    import onnxruntime as ort

    Path(tmp).write_bytes(export_onnx(model, shape))
    session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _torchscript(model, shape, tmp, meta, x) -> torch.Tensor:
    traced = torch.jit.trace(fold_bn(model), torch.zeros(1, *shape))
    torch.jit.save(torch.jit.freeze(traced.eval()), tmp)
    return torch.jit.load(tmp)(x)


def _safetensors(model, shape, tmp, meta, x) -> torch.Tensor:
    from caproj.models import CHECKPOINT_FORMAT, load_model, write_safetensors

    header = {**meta, "format": CHECKPOINT_FORMAT, "input_shape": list(shape)}
    header.pop("state_dict", None)
    write_safetensors(model.state_dict(), tmp, header)
    return load_model(tmp)[0](x)


def _pt2(model, shape, tmp, meta, x) -> torch.Tensor:
    program = torch.export.export(fold_bn(model), (x,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp)
    return torch.export.load(tmp).module()(x)


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "safetensors": _safetensors,
            "pt2": _pt2}


# ----------------------------------------------------------------------------- latency report
LATENCY_FORMS = ("eager", "fold_bn_cl", "inductor", "onnxruntime")


def latency_report(orig: nn.Module, small: nn.Module, shape: tuple[int, ...],
                   threads: int | None = None, forms: tuple[str, ...] = LATENCY_FORMS,
                   batches: tuple[int, ...] = (1, 64), rounds: tuple[int, int] = (15, 8)
                   ) -> dict[str, Any]:
    """Original vs compressed in each inference form, interleaved in the same run
    (metrics.compare_latency). An optional measurement: a form that cannot be built or run
    here (no onnxruntime, no C++ compiler, an op the exporter refuses) is skipped with a
    one-line note in `latency_notes`, never an exception."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    with metrics.threads(threads):  # set before runtime sessions (onnxruntime) are created
        for form in forms:
            try:
                o, s = (for_inference(m, form, shape) for m in (orig, small))
                for b in batches:
                    r = metrics.compare_latency({"before": o, "after": s}, shape, b,
                                                rounds=rounds[0] if b == 1 else rounds[1])
                    key = f"latency_{form}_b{b}"
                    out[f"{key}_before_ms"] = r["before"]["median_ms"]
                    out[f"{key}_after_ms"] = r["after"]["median_ms"]
                    out[f"{key}_speedup"] = r["after"]["speedup"]
            except Exception as e:  # noqa: BLE001  (any failure of an optional form)
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else \
                    type(e).__name__
                notes.append(f"{form}: {msg}")
                log.warning("latency form %s skipped: %s", form, msg)
    if notes:
        out["latency_notes"] = notes
    return out
