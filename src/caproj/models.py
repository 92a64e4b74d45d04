"""Model zoo and checkpoints.

Plain nn.Modules in the style of torchvision's model files:
- CIFAR ResNet-20/32/44/56/110 (He et al. 2016, "option A" zero-padding shortcuts), the same
  parameter names as akamaster/pytorch_resnet_cifar10 so its checkpoints load directly;
- CIFAR VGG-16-BN;
- `digits-cnn`, the small network of `caproj demo`;
- any torchvision classification model as `tv:<name>` (e.g. `tv:resnet18`);
- any timm model as `timm:<name>` (e.g. `timm:resnet18d`; needs the timm package).

Checkpoints: `read_checkpoint` accepts `{"state_dict": {...}}` (with or without DataParallel's
`module.` prefix), a plain state_dict, or caproj's own format (architecture and, for compressed
models, the narrower layer shapes inside). Always `weights_only=True`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caproj.errors import CaprojError
from caproj.surgery import resize_to_state_dict

CHECKPOINT_FORMAT = "caproj-checkpoint-v1"


# ----------------------------------------------------------------------------- CIFAR ResNet
class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad `pad` channels on each side (no params).

    The padding is a fixed linear channel map E (`channel_map`). When stream projection
    compresses the streams on both sides (P_in, P_out), the shortcut becomes the 1x1 map
    P_out^T E P_in, held in `weight` (None for the original network)."""

    def __init__(self, in_planes: int, pad: int) -> None:
        super().__init__()
        self.in_planes, self.pad = in_planes, pad
        self.weight: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.conv2d(x[:, :, ::2, ::2], self.weight)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def channel_map(self) -> torch.Tensor:
        """E (c_out x c_in) of the original padding: output channel pad + i is input i."""
        c = self.in_planes
        e = torch.zeros(c + 2 * self.pad, c)
        e[torch.arange(c) + self.pad, torch.arange(c)] = 1.0
        return e

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise CaprojError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        widths, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            widths.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = widths
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


# ----------------------------------------------------------------------------- CIFAR VGG
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                              512, 512, 512, "M", 512, 512, 512, "M"]


class CifarVGG(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs: 13 convs, 5 max-pools, one linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 cfg: list[int | str] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg or VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ----------------------------------------------------------------------------- demo CNN
class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits (the demo): three conv-BN-ReLU layers and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


# ----------------------------------------------------------------------------- registry
def _resnet(depth: int) -> Callable[..., nn.Module]:
    return lambda num_classes=10, in_channels=3: CifarResNet(depth, num_classes, in_channels)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": _resnet(d) for d in (20, 32, 44, 56, 110)},
    "vgg16_bn": lambda num_classes=10, in_channels=3: CifarVGG(num_classes, in_channels),
    "digits-cnn": lambda num_classes=10, in_channels=1: DigitsCNN(num_classes, in_channels),
}

# Input shape (C, H, W) each architecture is measured at by default.
DEFAULT_INPUT = {"digits-cnn": (1, 8, 8)}


def default_input_shape(arch: str) -> tuple[int, int, int]:
    if arch in DEFAULT_INPUT:
        return DEFAULT_INPUT[arch]
    return (3, 224, 224) if arch.startswith(("tv:", "timm:")) else (3, 32, 32)


def list_archs() -> list[str]:
    return sorted(ARCHS) + ["tv:<torchvision model name>", "timm:<timm model name>"]


def build_model(arch: str, num_classes: int = 10, in_channels: int | None = None,
                **kwargs: Any) -> nn.Module:
    if num_classes < 1:
        raise CaprojError(f"num_classes must be >= 1, got {num_classes}")
    if arch.startswith("tv:"):
        import torchvision

        name = arch[3:]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise CaprojError(f"unknown torchvision classification model {name!r} "
                              f"(see torchvision.models.list_models())")
        if in_channels not in (None, 3):
            raise CaprojError(f"{arch} takes 3 input channels, data has {in_channels}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                            **kwargs)
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise CaprojError(f"{arch} needs the timm package: pip install timm") from None
        name = arch[5:]
        if name not in timm.list_models():
            raise CaprojError(f"unknown timm model {name!r} (see timm.list_models())")
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels or 3)
    if arch not in ARCHS:
        raise CaprojError(f"unknown architecture {arch!r}; choose one of: "
                          f"{', '.join(list_archs())}")
    kw: dict[str, Any] = {"num_classes": num_classes}
    if in_channels is not None:
        kw["in_channels"] = in_channels
    return ARCHS[arch](**kw)


# ----------------------------------------------------------------------------- checkpoints
def _is_safetensors(p: Path) -> bool:
    """safetensors files start with an 8-byte header length and a JSON object."""
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(p: Path) -> dict[str, Any]:
    import json

    try:
        from safetensors import safe_open
    except ImportError:
        raise CaprojError(f"{p} is a safetensors file: pip install safetensors") from None
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        ck = json.loads(meta["caproj"]) if "caproj" in meta else {}
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CaprojError(f"cannot read safetensors checkpoint {p}: {msg}") from None
    return {**ck, "state_dict": sd}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely and return {"state_dict": ..., plus caproj metadata if any}."""
    p = Path(path)
    if not p.is_file():
        raise CaprojError(f"checkpoint not found: {p}")
    if _is_safetensors(p):
        return _read_safetensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/truncated/pickled files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = msg.split(". ")[0][:120]  # torch's first sentence says what is wrong
        raise CaprojError(f"cannot read checkpoint {p}: not a valid weights-only PyTorch file "
                          f"({msg})") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise CaprojError(f"checkpoint {p} holds no state_dict (expected a dict of tensors or "
                          f"{{'state_dict': ...}})")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CaprojError(f"checkpoint {p}: state_dict contains non-tensor values")
    return {"state_dict": strip_prefix(sd, "module.")}


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`sd` with `prefix` taken off its keys, keeping the per-module versions in `_metadata`
    (which some modules' loaders read: torchvision's MNASNet, BatchNorm)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(
        (k.removeprefix(prefix), v) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == prefix.rstrip(".") else k.removeprefix(prefix), v)
            for k, v in meta.items())
    return out


def fitting_kwargs(name: str, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments that make torchvision model `name` fit the state dict it is given:
    GoogLeNet / Inception v3 with or without their auxiliary heads (torchvision's own
    pretrained weights have none)."""
    if name in ("googlenet", "inception_v3"):
        aux = any(k.startswith(("aux1.", "aux2.", "AuxLogits.")) for k in sd)
        return {"aux_logits": aux, "init_weights": False}
    return {}


def check_finite(sd: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights with NaN/Inf, naming the first bad tensor (they would only surface later as
    a diverging loss with a misleading hint)."""
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise CaprojError(f"checkpoint {where}: tensor {k!r} has {bad} non-finite "
                              f"value(s) (NaN/Inf)")


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], arch: str) -> None:
    """Raise a one-line error naming the first key/shape that does not fit `model`."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            if k.endswith("num_batches_tracked"):
                continue
            raise CaprojError(f"checkpoint does not fit {arch}: missing key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CaprojError(f"checkpoint does not fit {arch}: {k!r} has shape "
                              f"{tuple(sd[k].shape)} in the checkpoint, {tuple(v.shape)} "
                              f"in the model")
    for k in sd:
        if k not in own:
            raise CaprojError(f"checkpoint does not fit {arch}: unexpected key {k!r}")


def load_model(weights: str | os.PathLike | None, arch: str | None = None,
               num_classes: int | None = None, in_channels: int | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Build `arch` and load `weights` into it. caproj checkpoints carry their own arch (and
    compressed widths); foreign ones need `arch`. Returns (model in eval mode, metadata)."""
    meta: dict[str, Any] = {}
    if weights is None:
        if arch is None:
            raise CaprojError("give arch (and optionally weights)", param="arch")
        model = build_model(arch, num_classes or 10, in_channels)
        return model.eval(), {"arch": arch}
    ck = read_checkpoint(weights)
    sd = ck["state_dict"]
    if ck.get("format") == CHECKPOINT_FORMAT:
        meta = {k: v for k, v in ck.items() if k != "state_dict"}
        if arch is not None and arch != meta["arch"]:
            raise CaprojError(f"checkpoint {weights} is a {meta['arch']}, not {arch}")
        arch = meta["arch"]
        num_classes = num_classes or meta.get("num_classes")
        in_channels = in_channels or meta.get("in_channels")
    if arch is None:
        raise CaprojError(f"checkpoint {weights} does not name its architecture; pass arch "
                          f"(or load it into your own model: caproj.load(path, model=...))",
                          param="arch")
    check_finite(sd, str(weights))
    if num_classes is None:
        num_classes = guess_num_classes(sd)
    model = build_model(arch, num_classes, in_channels,
                        **(fitting_kwargs(arch[3:], sd) if arch.startswith("tv:") else {}))
    if meta.get("compressed"):
        resize_to_state_dict(model, sd)
    check_state_dict(model, sd, arch)
    model.load_state_dict(sd, strict=False)
    meta.setdefault("arch", arch)
    return model.eval(), meta


def guess_num_classes(sd: dict[str, torch.Tensor]) -> int:
    """The last 2-D weight in a state_dict is the classifier's (true for every model here)."""
    last = [v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
    return int(last[-1].shape[0]) if last else 10


def write_safetensors(sd: dict[str, torch.Tensor], path: str | os.PathLike,
                      header: dict[str, Any]) -> None:
    """Tensors plus caproj's metadata (JSON in the header's "caproj" entry) as safetensors."""
    import json

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CaprojError("safetensors files need: pip install safetensors") from None
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path),
              metadata={"caproj": json.dumps(header, default=str)})


def make_checkpoint(model: nn.Module, arch: str, **meta: Any) -> dict[str, Any]:
    """A caproj checkpoint: tensors plus metadata reduced to plain JSON types, so that it always
    loads with weights_only=True."""
    import json

    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    plain = json.loads(json.dumps(meta, default=str))
    return {"format": CHECKPOINT_FORMAT, "arch": arch, "state_dict": sd, **plain}
