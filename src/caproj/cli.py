"""The `caproj` command line: info, eval, train, compress, bench, export, demo.

A thin shell over the library (`caproj.api`): it turns flags into parameters, caproj's data
specs (digits, cifar10, an ImageFolder directory or archive) into iterables of batches, prints
what the library logs, and turns a `CaprojError` into one line `caproj: error: ...` (naming the
flag for the parameter at fault) and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caproj import dist
from caproj.config import (
    CAP,
    CHANNEL_MULTIPLE,
    FINETUNE,
    PRESETS,
    SAVE_EVERY,
    SYNTH,
    TRAIN,
    CapConfig,
    TrainConfig,
)
from caproj.errors import CaprojError
from caproj.latency import RUNTIMES
from caproj.methods import METHODS
from caproj.version import __version__

EXAMPLES = {
    "info": """examples:
  caproj info --arch resnet56
  caproj info --arch tv:resnet18 --input-size 3,224,224 --layers
  caproj info --weights r56-cap.pt --latency""",
    "eval": """examples:
  caproj eval --arch resnet56 --weights ../shared/models/resnet56-4bfd9763.th \\
              --data ../shared/data/cifar10-jpeg.tar.gz
  caproj eval --weights r56-cap.pt --data ../shared/data/cifar10-jpeg.tar.gz""",
    "train": """examples:
  caproj train --arch digits-cnn --data digits --epochs 15 --out digits.pt
  caproj train --arch resnet20 --data ../shared/data/cifar10-jpeg.tar.gz --epochs 3 \\
               --weights ../shared/models/resnet20-12fca82f.th --lr 0.02 --out r20.pt""",
    "compress": """examples:
  caproj compress --arch resnet56 --weights ../shared/models/resnet56-cifar10jpeg.th \\
                  --data ../shared/data/cifar10-jpeg.tar.gz --target-macs 0.5 \\
                  --finetune-epochs 3 --out r56-cap.pt
  caproj compress --arch resnet56 --weights ../shared/models/resnet56-cifar10jpeg.th \\
                  --data ../shared/data/cifar10-jpeg.tar.gz --target-macs 0.25 \\
                  --finetune-epochs 3 --out r56-deep.pt      # picks the "deep" preset
  caproj compress --weights digits.pt --data digits --keep 0.5 --method l1 --preset none \\
                  --out digits-l1.pt""",
    "bench": """examples:
  caproj bench --arch resnet20 --weights ../shared/models/resnet20-cifar10jpeg.th \\
               --data ../shared/data/cifar10-jpeg.tar.gz --out-dir bench-r20
  caproj bench --arch resnet56 --weights ../shared/models/resnet56-cifar10jpeg.th \\
               --data ../shared/data/cifar10-jpeg.tar.gz --methods cap,tp-l2 \\
               --targets 0.5 --finetune-epochs 3 --out-dir bench-r56
  (re-running the same command resumes: finished cells are kept)""",
    "export": """examples:
  caproj export --weights r56-cap.pt --format onnx --out r56-cap.onnx
  caproj export --arch resnet56 --weights ../shared/models/resnet56-cifar10jpeg.th \\
                --format pt2 --out r56.pt2     # torch.export program
  caproj export --weights r56-cap.pt --format safetensors --out r56-cap.safetensors
  caproj eval --weights r56-cap.safetensors --data cifar10   # rebuilt from its metadata""",
    "presets": """examples:
  caproj presets            # every preset, the job it is for and its measured row
  caproj presets --json     # the same as JSON""",
    "demo": """examples:
  caproj demo              # train a small CNN on the bundled digits, then compress it
  caproj demo --out demo.pt""",
}


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _seeds(s: str) -> list[int]:
    try:
        seeds = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {s!r}")
    return seeds


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _input_size(s: str) -> tuple[int, ...]:
    try:
        t = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W like 3,32,32, got {s!r}") from None
    if len(t) != 3 or min(t) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W like 3,32,32, got {s!r}")
    return t


def _add_model_args(p: argparse.ArgumentParser, need_weights: bool = False) -> None:
    p.add_argument("--arch", help="architecture: resnet20/32/44/56/110, vgg16_bn, digits-cnn, "
                   "tv:<torchvision name>; optional for caproj checkpoints")
    p.add_argument("--weights", required=need_weights, help="checkpoint (.th/.pt): caproj's, "
                   "{'state_dict': ...} with or without 'module.' prefix, or a plain state_dict")
    p.add_argument("--num-classes", type=_positive_int, help="classes (default: from data/ckpt)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0), recorded")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"caproj: error: {self.prog.removeprefix('caproj ')}: {message}"
              if self.prog != "caproj" else f"caproj: error: {message}", file=sys.stderr)
        sys.exit(2)


def _info_flags(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--input-size", type=_input_size, help="C,H,W (default: per architecture)")
    p.add_argument("--layers", action="store_true", help="print the per-layer table")
    p.add_argument("--latency", action="store_true", help="measure CPU/GPU latency, batch 1/64")
    p.add_argument("--sites", action="store_true", help="list the compressible sites and why "
                   "each other producer is not one")
    p.add_argument("--stream-projection", action="store_true",
                   help="with --sites: residual streams as tied sites too")
    _add_common(p)



def _eval_flags(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, need_weights=True)
    _add_data_args(p)
    p.add_argument("--batch-size", type=_positive_int, default=500)
    _add_common(p)



def _train_flags(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_data_args(p)
    add_config_flags(p, TrainConfig, TRAIN)
    p.add_argument("--teacher", help="checkpoint to distil from (with --kd W), e.g. the "
                   "original model when fine-tuning a compressed one")
    p.add_argument("--out", required=True, help="output checkpoint path (written atomically)")
    _add_resume_args(p)
    _add_common(p)



def _budget_flags(p: argparse.ArgumentParser) -> None:
    """What to compress to: a channel, MACs or latency budget, or given widths."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=_fraction, help="fraction of channels kept per site")
    budget.add_argument("--target-macs", type=_fraction,
                        help="fraction of the original MACs to keep (default 0.5)")
    budget.add_argument("--widths-from", metavar="REPORT",
                        help="the per-site widths of an earlier run's --report (JSON): the "
                        "same network again, e.g. one a --target-latency run chose")
    budget.add_argument("--target-latency", type=_fraction,
                        help="fraction of the original's latency measured in --runtime at "
                        "--latency-batch and --threads (per-layer latency model, cached)")
    p.add_argument("--runtime", choices=RUNTIMES, default="eager",
                   help="where --target-latency is measured: eager PyTorch (BN folded; "
                   "default), inductor (torch.compile) or onnxruntime (CPU)")
    p.add_argument("--latency-batch", type=_positive_int, default=1,
                   help="batch size --target-latency is measured at (default 1)")
    p.add_argument("--latency-threads", type=_positive_int,
                   help="CPU threads --target-latency is measured with (default: --threads)")
    p.add_argument("--channel-multiple", type=_positive_int, default=CHANNEL_MULTIPLE,
                   help="keep widths at multiples of this where a site is wide enough "
                   "(default %(default)s: fast CPU kernels; 1 = any width)")
    p.add_argument("--stream-projection", action=argparse.BooleanOptionalAction,
                   help="also project residual streams (block outputs, shortcuts, stem, "
                   "classifier input), one shared P per tied group (beyond the paper; "
                   "default: the preset's)")
    p.add_argument("--allocate", choices=("uniform", "auto"), dest="allocation",
                   help="per-site widths for --target-macs: uniform ratio (default, unless "
                   "the preset says otherwise) or auto (greedy by measured sensitivity x "
                   "channel spectrum per MAC)")


def _compress_flags(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, need_weights=True)
    _add_data_args(p)
    p.add_argument("--preset", choices=("auto", *PRESETS, "none"), default="auto",
                   help="measured configuration (caproj presets lists them): auto (default: "
                   "chosen from the job: target depth, fine-tune budget, labels, images, "
                   "whether the original fits the data, a latency target), a name, or none "
                   "(caproj's plain defaults); flags you give override the preset's")
    p.add_argument("--method", choices=tuple(METHODS),
                   help="compression method (default: the preset's, CaP)")
    _budget_flags(p)
    add_config_flags(p, CapConfig, CAP, presets=True)
    add_config_flags(p, TrainConfig, FINETUNE, rename={"epochs": "--finetune-epochs"},
                     presets=True, epochs_default=0)
    p.add_argument("--budget-images", type=_nonneg_int,
                   help="the training budget as a whole: CaP's steps x batch + fine-tuning "
                   f"images (default {CAP.steps} x {CAP.batch_size} + --finetune-epochs of the "
                   "data; a preset without CaP steps fine-tunes for CaP's share)")
    p.add_argument("--out", required=True)
    p.add_argument("--report", help="also write the full report (JSON) here")
    p.add_argument("--label-free", action="store_true", help="compress and fine-tune without "
                   "reading the training labels (distillation from the original + "
                   "reconstruction); the test split's labels still measure accuracy")
    p.add_argument("--eval-data", help="labelled data whose test split measures accuracy "
                   "(default: --data's own test split; needed with unlabeled:DIR or "
                   "synthetic:N data to report accuracy)")
    p.add_argument("--synth-steps", type=_positive_int, default=SYNTH.steps,
                   help="with --data synthetic:N: optimisation steps per batch of synthetic "
                   "images (default %(default)s)")
    p.add_argument("--synth-batch-size", type=_positive_int, default=SYNTH.batch_size,
                   help="with --data synthetic:N: images synthesised together, whose batch "
                   "statistics are matched (default %(default)s)")
    p.add_argument("--input-size", type=_input_size, help="C,H,W of the synthetic images "
                   "with --data synthetic:N (default: from the checkpoint or architecture)")
    p.add_argument("--latency", choices=("none", "fast", "full"), default="fast",
                   help="latency report after the model is saved: none, fast (default: "
                   "BN folded + channels_last, batch 1 and 64, few rounds) or full (eager, "
                   "BN folded, inductor, onnxruntime)")
    _add_resume_args(p)
    _add_common(p)



def _presets_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print them as JSON")



def _bench_flags(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, need_weights=True)
    _add_data_args(p)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated registered methods (default: all, %(default)s); a "
                   "method may carry options, spelled as compress's flags without '--': "
                   "cap:stream-projection:allocation=auto, cp:match-scale:ridge-to=projected:"
                   "ridge=0.1 (cells are named with '+' for ':'). The bench runs every "
                   "method with the same recipe, not the presets")
    p.add_argument("--targets", default="0.5,0.25", help="MACs fractions (default 0.5,0.25)")
    p.add_argument("--channel-multiple", type=_positive_int, default=CHANNEL_MULTIPLE)
    # the same CaP settings and fine-tune recipe for every method
    add_config_flags(p, CapConfig, CAP)
    add_config_flags(p, TrainConfig, FINETUNE, rename={"epochs": "--finetune-epochs"},
                     epochs_default=1)
    p.add_argument("--out-dir", required=True, help="one JSON per cell, results.md, plot.png")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds: one cell per seed "
                   "(CaP, data order and fine-tuning), the table gives mean ± std")
    p.add_argument("--equal-compute", action="store_true",
                   help="give every method the same training images (the largest CaP steps x "
                   "batch + fine-tuning total, and the cells already in --out-dir), extending "
                   "the others' fine-tuning")
    p.add_argument("--budget-images", type=_positive_int,
                   help="with --equal-compute: this many training images per cell instead")
    p.add_argument("--no-latency", action="store_true",
                   help="skip each cell's CPU latency report (accuracy and MACs only)")
    _add_common(p)



def _export_flags(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, need_weights=True)
    p.add_argument("--format", choices=("onnx", "torchscript", "safetensors", "pt2"),
                   default="onnx", help="onnx (default; onnxruntime), torchscript "
                   "(torch.jit.load), safetensors (weights + caproj metadata: caproj eval "
                   "loads it), pt2 (torch.export)")
    p.add_argument("--input-size", type=_input_size, help="C,H,W (default: from checkpoint)")
    p.add_argument("--out", required=True)
    _add_common(p)



def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="also save the compressed model here")
    _add_common(p)



COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "info": ("MACs, params (and optionally per-layer table and latency) of a model",
             _info_flags),
    "eval": ("top-1 accuracy of a model on a dataset's test split", _eval_flags),
    "train": ("train or fine-tune a model; writes a caproj checkpoint", _train_flags),
    "compress": ("compress a model with Cascaded Projection, then fine-tune it",
                 _compress_flags),
    "presets": ("list the presets: the job each is for, its settings, its measured row",
                _presets_flags),
    "bench": ("compare CaP with pruning, factorisation and Torch-Pruning side by side",
              _bench_flags),
    "export": ("export a (compressed) model for deployment: ONNX or torch.export",
               _export_flags),
    "demo": ("offline end-to-end demo on the bundled digits data", _demo_flags),
}


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="caproj", description="Compress CNNs with Cascaded "
                                 "Projection and measure them honestly.")
    ap.add_argument("--version", action="version", version=f"caproj {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    ap.commands = {}  # type: ignore[attr-defined]  # name -> its parser (the docs read them)
    for name, (help, add_flags) in COMMANDS.items():
        ap.commands[name] = sub.add_parser(  # type: ignore[attr-defined]
            name, help=help, description=help, epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter)
        add_flags(ap.commands[name])  # type: ignore[attr-defined]
    return ap


def _default_text(cls: type, name: str, default: Any, presets: bool) -> str:
    shown = "unset" if default is None else f"{default:g}" if isinstance(default, float) \
        else str(default)
    if presets and any(name in dict(getattr(p, "cap" if cls is CapConfig else "finetune"))
                       for p in PRESETS.values()):
        return f"default: the preset's, else {shown}"
    return f"default: {shown}"


def add_config_flags(p: argparse.ArgumentParser, cls: type, defaults: Any, *,
                     rename: dict[str, str] | None = None, presets: bool = False,
                     epochs_default: int | None = None) -> None:
    """One flag per `cls` field that declares one (`caproj.config.flag`: name, help, section),
    its default read from `defaults`. Every flag is unset (None) unless given: the library
    then applies the preset's value (`presets`: the help says so) or its own default; only
    the epochs take `epochs_default` (compress 0, bench 1) when it is given."""
    groups: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata:
            continue
        m, t = f.metadata, hints[f.name]
        default = getattr(defaults, f.name)
        if f.name == "epochs" and epochs_default is not None:
            default = epochs_default
        g = groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        shown = _default_text(cls, f.name, default, presets)
        kw: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "help": f"{m['help']} ({shown})",
                              "default": epochs_default if f.name == "epochs" else None}
        if bool in (t, *typing.get_args(t)):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = next(a for a in (int, float, str) if a in (t, *typing.get_args(t)))
            kw["choices"] = m["choices"]
            kw["metavar"] = None if m["choices"] else f.name.split("_")[-1].upper()
        g.add_argument((rename or {}).get(f.name, m["flag"]), **kw)


def config_flags(parser: argparse.ArgumentParser) -> dict[tuple[str, str], str]:
    """(config class name, field) -> the flag that sets it, for one command's parser."""
    return {tuple(a.dest.split(".")): a.option_strings[0]  # type: ignore[misc]
            for a in parser._actions if "." in a.dest}


def config_options(a: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The `cls` fields whose flags were given."""
    return {f.name: v for f in dataclasses.fields(cls)
            if (v := getattr(a, f"{cls.__name__}.{f.name}", None)) is not None}


def config_from(a: argparse.Namespace, cls: type, base: Any, **fixed: Any) -> Any:
    """`base` with the given flags (and `fixed`) applied; a bad value names its flag."""
    try:
        return base.replace(**{**config_options(a, cls), **fixed})
    except CaprojError as e:
        flag = getattr(a, "_flags", {}).get((cls.__name__, e.param or ""))
        msg = re.sub(rf"(?<![\w-]){e.param}\b", flag, str(e)) if flag and e.param else str(e)
        raise CaprojError(msg, e.param) from None


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="digits | cifar10 | ImageFolder dir | archive "
                   "| unlabeled:DIR (images in any layout, labels never read) | synthetic:N "
                   "(compress only: N images made from the model's BatchNorm statistics, no "
                   "data at all)")
    p.add_argument("--image-size", type=_positive_int, help="resize images to this size "
                   "(with --stream: the crop size, default 224)")
    p.add_argument("--stream", action="store_true",
                   help="read an ImageFolder directory lazily with DataLoader workers and "
                   "ImageNet transforms instead of decoding it into memory (ImageNet-size data)")
    p.add_argument("--workers", type=_nonneg_int, help="DataLoader workers with --stream "
                   "(default: min(8, CPUs))")
    p.add_argument("--split", type=_positive_int, help="a folder with one split (only val/, "
                   "say): calibrate/train on this many of its images (a seeded shuffle) and "
                   "evaluate on the rest")


def _add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its "
                   "state file (<out>.*state.pt, written every --save-every steps and on "
                   "SIGTERM/Ctrl-C)")
    p.add_argument("--save-every", type=_positive_int, default=SAVE_EVERY,
                   help="steps between state saves (default %(default)s)")


def _train_config(a: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    """The training flags given, over `base` (train: TRAIN; compress, bench: FINETUNE), the
    seed from --seed."""
    return config_from(a, TrainConfig, base, seed=a.seed)


def _fmt_m(v: float, digits: int = 2) -> str:
    return f"{v / 1e6:.{digits}f} M"


def cmd_info(a: argparse.Namespace) -> None:
    from caproj import metrics
    from caproj.models import default_input_shape, load_model

    model, meta = load_model(a.weights, a.arch, a.num_classes)
    arch = meta["arch"]
    shape = a.input_size or tuple(meta.get("input_shape") or default_input_shape(arch))
    s = metrics.summary(model, shape)
    print(f"{arch}{' (compressed)' if meta.get('compressed') else ''}  input {shape}")
    print(f"MACs: {_fmt_m(s['macs'])}   params: {_fmt_m(s['params'], 3)}")
    if a.layers:
        print(f"{'layer':32s} {'type':14s} {'MACs':>12s} {'params':>10s}  out")
        for r in metrics.layer_table(model, shape):
            if r["macs"] or r["params"]:
                print(f"{r['layer']:32s} {r['type']:14s} {r['macs']:12,d} {r['params']:10,d}  "
                      f"{r['out_shape']}")
    if a.sites:
        from caproj.sites import find_sites

        rep = find_sites(model, stream=a.stream_projection)
        print(f"{len(rep.sites)} sites:")
        for st in rep.sites:
            print(f"  {st}")
            if st.tied:
                print(f"      producers: {', '.join(p for p, _ in st.producers)}")
                print(f"      consumers: {', '.join(c for c, _ in st.consumers)}"
                      + (f"; maps in: {', '.join(st.maps_in)}" if st.maps_in else "")
                      + (f"; maps out: {', '.join(st.maps_out)}" if st.maps_out else ""))
        print(f"{len(rep.skipped)} producers that are not sites:")
        for name, why in rep.skipped.items():
            print(f"  {name}: {why}")
    if a.latency:
        for b in (1, 64):
            lat = metrics.measure_latency(model, shape, b, num_threads=a.threads)
            print(f"latency batch {b}: {lat.median_ms:.2f} ms median ({lat.runs} runs, "
                  f"{lat.threads} threads)")


def _data_and_model(a: argparse.Namespace):
    """The data and model of a job, checked against each other; model on the chosen device."""
    from caproj.data import load_data
    from caproj.models import default_input_shape, load_model
    from caproj.utils import check_input_shape, local_device, pick_device, seed_everything

    device = local_device(pick_device(a.device))
    if a.data.startswith(SYNTHETIC):
        if a.cmd != "compress":
            raise CaprojError(f"--data {SYNTHETIC}N is for compress (data-free compression); "
                              f"{a.cmd} needs real images")
        seed_everything(a.seed)
        model, meta = load_model(a.weights, a.arch, a.num_classes)
        shape = a.input_size or tuple(meta.get("input_shape") or default_input_shape(meta["arch"]))
        check_input_shape(model, shape)
        return SyntheticSpec.of(a.data, shape), model.to(device), meta
    data = load_data(a.data, a.image_size, stream=a.stream, workers=a.workers, split=a.split)
    seed_everything(a.seed)
    model, meta = load_model(a.weights, a.arch, a.num_classes or data.num_classes or None,
                             data.input_shape[0])
    _check_fits(model, data)
    return data, model.to(device), meta


SYNTHETIC = "synthetic:"  # --data synthetic:N: data-free compression


@dataclass
class SyntheticSpec:
    """`--data synthetic:N`: what the CLI's checkpoint and report need to know of it."""

    n: int
    input_shape: tuple[int, ...]
    labelled = False

    @classmethod
    def of(cls, spec: str, shape: tuple[int, ...]) -> SyntheticSpec:
        v = spec[len(SYNTHETIC):]
        if not v.isdigit() or int(v) < 1:
            raise CaprojError(f"--data {spec}: expected {SYNTHETIC}N with N >= 1 images")
        return cls(int(v), tuple(shape))

    @property
    def name(self) -> str:
        return f"{SYNTHETIC}{self.n}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "synthetic": self.n, "train": self.n, "test": 0,
                "labelled": False}


def _check_fits(model: torch.nn.Module, data) -> None:
    from caproj.models import guess_num_classes
    from caproj.utils import check_input_shape

    check_input_shape(model, data.input_shape)
    n = guess_num_classes(model.state_dict())
    if getattr(data, "labelled", True) and n != data.num_classes:
        raise CaprojError(f"model has {n} outputs but data {data.name} has {data.num_classes} "
                          f"classes")


def _batches(data, device: torch.device, batch_size: int, seed: int, calib_images: int = 0,
             test: bool = True):
    """caproj's data as the library's iterables: augmented training batches, unaugmented
    calibration images (a fixed random subset), test batches (`test`)."""
    from caproj.data import Batches

    train = Batches.train_of(data, batch_size, seed=seed, device=device)
    calib = Batches.subset_of(data, calib_images, 250, seed=seed, device=device) \
        if calib_images else None
    return train, calib, Batches.test_of(data, 500, device=device) if test else None


def _eval_batches(a: argparse.Namespace, data, model: torch.nn.Module, device: torch.device):
    """(test batches, their data's name) of --eval-data, else of --data's own test split;
    (None, None) when neither has labels (accuracy is then not measured)."""
    from caproj.data import Batches, load_data

    if a.eval_data:
        ev = load_data(a.eval_data, a.image_size)
        if not ev.labelled:
            raise CaprojError(f"--eval-data {a.eval_data} holds unlabeled images: accuracy "
                              f"needs labelled ones (an ImageFolder with class folders)")
        _check_fits(model, ev)
        return Batches.test_of(ev, 500, device=device), ev.name
    if not getattr(data, "labelled", True):
        return None, None
    return Batches.test_of(data, 500, device=device), data.name


def cmd_eval(a: argparse.Namespace) -> None:
    from caproj.api import evaluate
    from caproj.data import Batches

    data, model, meta = _data_and_model(a)
    device = next(model.parameters()).device
    r = evaluate(model, Batches.test_of(data, a.batch_size, device=device))
    print(f"{meta['arch']} on {data.name} test ({r['n']} images): top-1 {r['acc']:.2f} %  "
          f"(loss {r['loss']:.4f})")


def cmd_train(a: argparse.Namespace) -> None:
    from caproj.models import load_model, make_checkpoint
    from caproj.resume import Checkpointer, stop_on_signal
    from caproj.train import evaluate, fit
    from caproj.utils import atomic_save, check_output_path, run_record

    check_output_path(a.out)
    cfg = _train_config(a, TRAIN)
    data, model, meta = _data_and_model(a)
    device = next(model.parameters()).device
    teacher = None
    if cfg.kd_weight > 0:
        if not a.teacher:
            raise CaprojError("--kd needs --teacher CHECKPOINT")
        teacher, _ = load_model(a.teacher, meta["arch"], data.num_classes, data.input_shape[0])
        teacher.to(device)
    elif a.teacher:
        raise CaprojError("--teacher is used only with --kd W (W > 0)")
    train_b, _, test_b = _batches(data, device, cfg.batch_size, a.seed)
    ck = Checkpointer(f"{a.out}.state.pt", {"train": cfg.as_dict(), "data": data.describe(),
                                           "weights": str(a.weights), "teacher": a.teacher},
                      a.save_every, a.resume)
    with stop_on_signal():
        hist = fit(model, train_b, cfg, teacher=teacher, eval_data=test_b, checkpoint=ck)
    final = hist[-1] if hist else {f"test_{k}": v for k, v in evaluate(model, test_b).items()}
    out = make_checkpoint(model.cpu(), meta["arch"], num_classes=data.num_classes,
                          in_channels=data.input_shape[0], input_shape=list(data.input_shape),
                          compressed=bool(meta.get("compressed")), data=data.describe(),
                          train_config=cfg.as_dict(), history=hist,
                          metrics={"test_acc": final.get("test_acc")}, **run_record(a.seed))
    if dist.is_main():
        atomic_save(out, a.out)
    ck.finish()
    print(f"saved {a.out}: test acc {final.get('test_acc', float('nan')):.2f} %")


def _finetune_options(a: argparse.Namespace, ft: TrainConfig) -> dict[str, Any] | None:
    """compress's fine-tuning for the library: the flags given (the library fills in the rest
    from the preset, else FINETUNE); None without epochs or a budget."""
    if ft.epochs <= 0 and a.budget_images is None:
        return None
    return {**config_options(a, TrainConfig), "epochs": ft.epochs, "seed": a.seed}


LATENCY = {"none": (), "fast": ("fold_bn_cl",), "full": None}


def cmd_compress(a: argparse.Namespace) -> None:
    from caproj.api import compress
    from caproj.resume import stop_on_signal
    from caproj.utils import check_output_path

    check_output_path(a.out)
    if a.report:
        check_output_path(a.report)
    cap = config_from(a, CapConfig, CAP)  # bad settings fail now, naming their flags
    cap_options = config_options(a, CapConfig)
    ft = _train_config(a, FINETUNE)
    budget = _budget_of(a)
    data, model, meta = _data_and_model(a)
    if meta.get("compressed"):
        raise CaprojError(f"{a.weights} is already compressed; compress the original model")
    device = next(model.parameters()).device
    test_b, eval_name = _eval_batches(a, data, model, device)
    synthetic = isinstance(data, SyntheticSpec)
    if synthetic:
        train_b = calib_b = None
    else:
        train_b, calib_b, _ = _batches(data, device, ft.batch_size, a.seed, cap.calib_images,
                                       test=False)
    if test_b is None:
        print(f"{meta['arch']}: accuracy not measured: {data.name} has no labels (pass "
              f"--eval-data with labelled test images to measure it)")
    with stop_on_signal():
        res = compress(model, train_b, **budget, calib_data=calib_b, eval_data=test_b,
                       finetune=_finetune_options(a, ft), budget_images=a.budget_images,
                       preset=None if a.preset == "none" else a.preset, method=a.method,
                       seed=a.seed, channel_multiple=a.channel_multiple,
                       label_free=a.label_free, synthetic=data.n if synthetic else None,
                       synth_options={"steps": a.synth_steps,
                                      "batch_size": a.synth_batch_size} if synthetic else None,
                       example_inputs=torch.zeros(1, *data.input_shape, device=device)
                       if synthetic else None,
                       state_path=a.out, resume=a.resume, save_every=a.save_every,
                       **cap_options)
    if dist.is_main():  # torchrun: rank 0 writes and measures
        _write_compressed(a, res.report, res.model.cpu(), model, data, meta, ft)


def _budget_of(a: argparse.Namespace) -> dict[str, Any]:
    """compress's budget arguments from the flags; --widths-from reads the widths (and whether
    streams were sites) from an earlier report."""
    budget = {"keep": a.keep, "target_macs": a.target_macs, "target_latency": a.target_latency,
              "runtime": a.runtime, "latency_batch": a.latency_batch,
              "latency_threads": a.latency_threads or a.threads, "allocation": a.allocation,
              "stream_projection": a.stream_projection}
    if a.widths_from is None:
        return budget
    try:
        rep = json.loads(Path(a.widths_from).read_text())
    except (OSError, ValueError) as e:
        raise CaprojError(f"--widths-from: cannot read {a.widths_from!r} as JSON: "
                          f"{str(e).splitlines()[0]}") from None
    widths = rep.get("widths") if isinstance(rep, dict) else None
    if not (isinstance(widths, list) and widths and all(
            isinstance(k, int) and not isinstance(k, bool) for k in widths)):
        raise CaprojError(f"--widths-from: {a.widths_from!r} holds no per-site widths (the "
                          f"--report of caproj compress does)")
    if budget["stream_projection"] is None:
        budget["stream_projection"] = bool(rep.get("stream_projection"))
    return {**budget, "widths": widths}


def _write_compressed(a: argparse.Namespace, rep: dict[str, Any], small: nn.Module,
                      model: nn.Module, data: Any, meta: dict[str, Any], ft: TrainConfig
                      ) -> None:
    """The checkpoint first (atomically), then the optional latency report and JSON: a failing
    optional step leaves the finished result in place."""
    from caproj.deploy import LATENCY_FORMS, latency_report
    from caproj.models import guess_num_classes, make_checkpoint
    from caproj.utils import atomic_save, run_record

    num_classes = guess_num_classes(small.state_dict())

    def save() -> None:
        ck = make_checkpoint(small, meta["arch"], num_classes=num_classes,
                             in_channels=data.input_shape[0], input_shape=list(data.input_shape),
                             compressed=True, data=data.describe(),
                             train_config=rep.get("finetune_config", ft.as_dict()),
                             metrics={k: v for k, v in rep.items() if k != "cap_history"},
                             cap_history=rep.get("cap_history"), **run_record(a.seed))
        atomic_save(ck, a.out)

    save()  # the result is safe before any optional measurement
    forms = LATENCY[a.latency]
    if forms != ():
        fast = a.latency == "fast"
        rep.update(latency_report(model.cpu(), small, data.input_shape, a.threads,
                                  forms=LATENCY_FORMS if forms is None else forms,
                                  rounds=(8, 4) if fast else (15, 8)))
        save()  # again, with the latencies (atomic: the first file stays if this fails)
    if a.report:
        dump_json({"arch": meta["arch"], "data": data.describe(), **rep}, a.report)
    print(format_report(rep))
    print(f"saved {a.out}")


def format_report(rep: dict[str, Any]) -> str:
    from caproj.deploy import LATENCY_FORMS

    def row(name, before, after, fmt):
        ratio = before / after if after else float("nan")
        return f"  {name:22s} {fmt(before):>12s} {fmt(after):>12s}   {ratio:5.2f}x"

    acc_final = rep.get("acc_after_finetune", rep.get("acc_after_compress"))
    pre = rep.get("preset") or {}
    lines = [f"  preset {pre['name']}: {pre['reason']}"
             + (f" (overridden: {', '.join(pre['overridden'])})" if pre.get("overridden") else "")
             if pre.get("name") else "  no preset (caproj's plain defaults)"] if pre else []
    lines.append(f"  {'':22s} {'original':>12s} {'compressed':>12s}   ratio")
    if rep.get("acc_before") is not None and acc_final is not None:
        lines.append(f"  {'top-1 accuracy':22s} {rep['acc_before']:11.2f}% {acc_final:11.2f}%"
                     + (f"   (before fine-tuning: {rep['acc_after_compress']:.2f} %)"
                        if "acc_after_finetune" in rep else ""))
    else:
        lines.append(f"  {'top-1 accuracy':22s} not measured (no labelled data: --eval-data)")
    lines += [
        row("MACs", rep["macs_before"], rep["macs_after"], lambda v: f"{v / 1e6:.2f} M"),
        row("params", rep["params_before"], rep["params_after"], lambda v: f"{v / 1e6:.3f} M")]
    if rep.get("label_free"):
        df = rep.get("data_free")
        lines.append(f"  label-free: {df['n']} synthetic images (BN-statistics loss "
                     f"{df['bn_loss_start']:.1f} -> {df['bn_loss_end']:.1f}, {df['seconds']:.0f} s)"
                     if df else "  label-free: distillation from the original + reconstruction "
                     "(no labels read)")
    lat = rep.get("latency")
    if lat:
        name = f"latency {lat['runtime']} b{lat['batch']}"
        lines.append(f"  {name:22s} "
                     f"{lat['original_ms']:9.2f} ms {lat['compressed_ms']:9.2f} ms   "
                     f"{lat['speedup']:5.2f}x   (target {rep['target_latency']:g}: predicted "
                     f"{lat['predicted_ratio']:.3f}, measured {lat['measured_ratio']:.3f} of "
                     f"the original; {lat['threads']} threads)")
    for form in LATENCY_FORMS:
        for b in (1, 64):
            k = f"latency_{form}_b{b}"
            if f"{k}_before_ms" in rep:
                lines.append(f"  {f'latency {form} b{b}':22s} {rep[f'{k}_before_ms']:9.2f} ms "
                             f"{rep[f'{k}_after_ms']:9.2f} ms   {rep[f'{k}_speedup']:5.2f}x")
    if any(k.startswith("latency_") and k.endswith("_ms") for k in rep):
        lines.append("  (latency: medians of interleaved rounds; ratio = median of per-round "
                     "ratios)")
    for note in rep.get("latency_notes", []):
        lines.append(f"  latency form skipped: {note}")
    return "\n".join(lines)


def cmd_demo(a: argparse.Namespace) -> None:
    """Train digits-cnn on scikit-learn's digits, then compress it to half its MACs with CaP,
    all through the library API."""
    from caproj.api import compress, evaluate, save
    from caproj.data import load_data
    from caproj.deploy import latency_report
    from caproj.models import load_model
    from caproj.train import fit
    from caproj.utils import check_output_path, pick_device, seed_everything

    if a.out:
        check_output_path(a.out)
    device = pick_device(a.device)
    seed_everything(a.seed)
    data = load_data("digits")
    model, _ = load_model(None, "digits-cnn", data.num_classes, 1)
    model.to(device)
    print(f"digits: {len(data.train_y)} train / {len(data.test_y)} test images of 8x8")
    train_b, calib_b, test_b = _batches(data, device, 64, a.seed, 1000)
    logging.getLogger("caproj").setLevel(logging.WARNING)  # the demo prints its own summary
    fit(model, train_b, TrainConfig(epochs=15, lr=0.05, batch_size=64, seed=a.seed),
        eval_data=None)
    acc = evaluate(model, test_b)["acc"]
    print(f"trained digits-cnn: {acc:.2f} % test accuracy")
    res = compress(model, train_b, target_macs=0.5, calib_data=calib_b, eval_data=test_b,
                   calib_images=1000, steps=60, batch_size=64, log_every=0, seed=a.seed,
                   finetune={"epochs": 5, "lr": 0.02, "batch_size": 64})
    rep = res.report
    rep.update(latency_report(model.cpu(), res.model.cpu(), data.input_shape, a.threads,
                              forms=("eager",)))
    print(f"CaP to 50 % MACs ({len(res.sites)} sites, widths {res.widths}):")
    print(format_report(rep))
    if a.out:
        save(res.model.cpu(), a.out, arch="digits-cnn", num_classes=10, in_channels=1,
             input_shape=[1, 8, 8], data=data.describe(),
             metrics={k: v for k, v in rep.items() if k != "cap_history"}, seed=a.seed)
        print(f"saved {a.out}")


def cmd_presets(a: argparse.Namespace) -> None:
    if a.json:
        print(json.dumps({n: p.as_dict() for n, p in PRESETS.items()}, indent=2))
        return
    print("--preset auto (the default) tries these in order and takes the first whose job "
          "fits (caproj.config.choose_preset):\n")
    for name, p in PRESETS.items():
        opts = {**dict(p.cap), **{f"finetune.{k}": v for k, v in p.finetune},
                **dict(p.compress)}
        print(f"{name}\n  for: {p.job}")
        print(f"  method {p.method}; " + (", ".join(f"{k}={v}" for k, v in opts.items())
                                         or "caproj's defaults"))
        print(f"  measured: {p.measured.row()}" + (f"; {p.measured.note}"
                                                   if p.measured.note else ""))
        print(f"  command: {p.measured.command}")
        print(f"  json: {', '.join(p.measured.json)}\n")


def cmd_bench(a: argparse.Namespace) -> None:
    from caproj import bench
    from caproj.resume import stop_on_signal

    try:
        targets = [float(t) for t in a.targets.split(",")]
    except ValueError:
        raise CaprojError(f"--targets must be comma-separated numbers, got {a.targets!r}") from None
    for t in targets:
        if not 0 < t <= 1:
            raise CaprojError(f"--targets values must be in (0, 1], got {t}")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        bench.parse_method(m)  # unknown names fail before any work
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        raise CaprojError(f"--out-dir {out} exists and is not a directory")
    if a.budget_images is not None and not a.equal_compute:
        raise CaprojError("--budget-images applies only with --equal-compute")
    ft = _train_config(a, FINETUNE)
    cap_cfg = config_from(a, CapConfig, CAP, seed=a.seed, log_every=0)
    data, model, meta = _data_and_model(a)
    device = next(model.parameters()).device
    _, calib_b, test_b = _batches(data, device, ft.batch_size, a.seed, cap_cfg.calib_images)

    def train_for(seed: int):
        from caproj.data import Batches

        return Batches.train_of(data, ft.batch_size, seed=seed, device=device)

    with stop_on_signal():  # SIGTERM/SIGINT: the cell in progress saves its state and stops
        bench.run(model, train_for, calib_b, test_b, meta["arch"], methods, targets, ft,
                  cap_cfg, out, channel_multiple=a.channel_multiple, seeds=a.seeds,
                  equal_compute=a.equal_compute, budget_images=a.budget_images,
                  latency=not a.no_latency)
    print((out / "results.md").read_text())


def cmd_export(a: argparse.Namespace) -> None:
    """The written file is reloaded and checked against PyTorch before it appears."""
    from caproj import deploy
    from caproj.models import default_input_shape, guess_num_classes, load_model

    model, meta = load_model(a.weights, a.arch, a.num_classes)
    shape = a.input_size or tuple(meta.get("input_shape") or default_input_shape(meta["arch"]))
    meta.setdefault("num_classes", guess_num_classes(model.state_dict()))
    diff = deploy.export(model, a.format, a.out, shape, meta)
    print(f"wrote {a.out} ({a.format}, input {shape}); max abs diff to PyTorch {diff:.2e}")


BARE = ("keep", "runtime")  # parameters named without "=" in messages, besides a_b names


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Library parameter -> the flag of this command that sets it, generated from the parser:
    a flag's dest is the API parameter it sets (a config flag's, "Class.field") and a name
    two flags share (CaP's and fine-tuning's lr) is left as it is."""
    acts = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    names = [a.dest.rsplit(".", 1)[-1] for a in acts]
    return {n: a.option_strings[0] for n, a in zip(names, acts, strict=True)
            if names.count(n) == 1}


def translate(e: CaprojError, flags: dict[str, str]) -> str:
    """The library's message in one line, its parameter names replaced by the command's
    flags (`flags_of`): `name=True` -> the flag, `name=N` -> `flag N`."""
    msg = "; ".join(str(e).split("\n"))
    for param in sorted(flags, key=len, reverse=True):
        bare = "_" in param or param in BARE
        pattern = rf"(?<![\w.-]){param}(=True|=N)" + ("?" if bare else "") + r"(?!\w)"
        msg = re.sub(pattern, lambda m, f=flags[param]: f + (" N" if m.group(1) == "=N"
                                                              else ""), msg)
    return msg


def command_parser(ap: argparse.ArgumentParser, cmd: str) -> argparse.ArgumentParser:
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[cmd]


class _Echo(logging.Handler):
    """The library's log records, printed as plain lines (rank 0 only)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr if record.levelno >= logging.WARNING
              else sys.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    flags = flags_of(command_parser(ap, args.cmd))
    args._flags = config_flags(command_parser(ap, args.cmd))
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a log as they are printed
        sys.stdout.reconfigure(line_buffering=True)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    root = logging.getLogger("caproj")
    handler = _Echo()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    handlers = {"info": cmd_info, "eval": cmd_eval, "train": cmd_train,
                "compress": cmd_compress, "demo": cmd_demo, "bench": cmd_bench,
                "presets": cmd_presets,
                "export": cmd_export}
    t0 = time.perf_counter()
    try:
        _join_torchrun(args)
        handlers[args.cmd](args)
    except CaprojError as e:
        where = f" (rank {dist.rank()})" if dist.world() > 1 else ""
        print(f"caproj: error{where}: {translate(e, flags)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("caproj: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()
        root.removeHandler(handler)
    if args.cmd in ("train", "compress", "demo", "bench"):
        print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _join_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group; rank 0 alone prints."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if args.cmd not in ("train", "compress"):
        raise CaprojError(f"{args.cmd} runs in one process; only train and compress run "
                          f"under torchrun")
    from caproj.utils import pick_device

    dist.init_from_env(pick_device(args.device))
    if not dist.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)


def dump_json(obj, path: str | Path) -> None:
    from caproj.utils import atomic_write_text

    atomic_write_text(json.dumps(obj, indent=2, default=str), path)


if __name__ == "__main__":
    sys.exit(main())
