"""Bad inputs a user can give the CLI, the one-line message each must get, and the files they
need. Used by tests/test_bad_inputs.py and by scripts/bad_inputs_table.py (which writes the
table in docs/bad-inputs.md from real runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# (what is wrong, CLI arguments, part of the expected one-line message)
CASES: list[tuple[str, list[str], str]] = [
    ("checkpoint file missing",
     ["eval", "--arch", "resnet20", "--weights", "nope.th", "--data", "digits"],
     "checkpoint not found: nope.th"),
    ("checkpoint is not a PyTorch file",
     ["eval", "--arch", "resnet20", "--weights", "garbage.th", "--data", "digits"],
     "cannot read checkpoint garbage.th: not a valid weights-only PyTorch file"),
    ("checkpoint truncated (half the bytes)",
     ["eval", "--arch", "resnet20", "--weights", "truncated.th", "--data", "rgb3"],
     "cannot read checkpoint truncated.th: not a valid weights-only PyTorch file"),
    ("checkpoint file empty",
     ["eval", "--arch", "resnet20", "--weights", "empty.th", "--data", "rgb3"],
     "cannot read checkpoint empty.th"),
    ("checkpoint of another architecture",
     ["eval", "--arch", "resnet56", "--weights", "r20.th", "--data", "rgb3"],
     "checkpoint does not fit resnet56"),
    ("checkpoint input channels differ from the data (RGB weights, grey digits)",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "digits"],
     "'conv1.weight' has shape (16, 3, 3, 3) in the checkpoint, (16, 1, 3, 3)"),
    ("checkpoint has another number of classes (100 vs 3)",
     ["eval", "--weights", "c100.pt", "--data", "rgb3"],
     "'linear.weight' has shape (100, 64) in the checkpoint, (3, 64) in the model"),
    ("checkpoint with a NaN inside (refused at load, naming the tensor)",
     ["eval", "--arch", "resnet20", "--weights", "nan.th", "--data", "rgb3"],
     "tensor 'conv1.weight' has 1 non-finite value(s)"),
    ("unknown timm model",
     ["info", "--arch", "timm:resnet999"], "unknown timm model 'resnet999'"),
    ("CaP learning rate negative",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--cap-lr", "-1", "--out", "o.pt"], "--cap-lr: lr must be a finite number >= 0"),
    ("unknown architecture",
     ["info", "--arch", "resnet57"], "unknown architecture 'resnet57'"),
    ("unknown torchvision model",
     ["info", "--arch", "tv:resnet999"], "unknown torchvision classification model"),
    ("model with no compressible site",
     ["compress", "--arch", "tv:shufflenet_v2_x0_5", "--weights", "shufflenet.th", "--data",
      "rgb3", "--out", "o.pt"],
     "no compressible site in ShuffleNetV2"),
    ("--keep 0", ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
                  "--keep", "0", "--out", "o.pt"], "must be in (0, 1], got 0"),
    ("--keep 1.5", ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
                    "--keep", "1.5", "--out", "o.pt"], "must be in (0, 1], got 1.5"),
    ("--keep nan", ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
                    "--keep", "nan", "--out", "o.pt"], "must be in (0, 1], got nan"),
    ("--target-macs unreachable",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--target-macs", "0.0001", "--out", "o.pt"], "target-macs 0.0001 is unreachable"),
    ("--epochs -1", ["train", "--arch", "resnet20", "--data", "rgb3", "--epochs", "-1",
                     "--out", "o.pt"], "epochs must be >= 0, got -1"),
    ("--lr nan", ["train", "--arch", "resnet20", "--data", "rgb3", "--lr", "nan",
                  "--out", "o.pt"], "lr must be a positive number, got nan"),
    ("--kd without a teacher", ["train", "--arch", "resnet20", "--data", "rgb3", "--kd", "0.5",
                                "--out", "o.pt"], "--kd needs --teacher CHECKPOINT"),
    ("bench target out of range",
     ["bench", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3", "--targets",
      "0.5,2", "--out-dir", "bench"], "(0, 1], got 2.0"),
    ("bench method unknown",
     ["bench", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3", "--methods",
      "cap,magic", "--out-dir", "bench"], "unknown method 'magic'"),
    ("data path missing",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "nowhere/"],
     "data not found"),
    ("dataset with empty class folders",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "empty_classes"],
     "class folder train/a/ has no images"),
    ("dataset with one class",
     ["train", "--arch", "resnet20", "--data", "one_class", "--out", "o.pt"],
     "has only one class ('a'); classification needs at least two"),
    ("ImageFolder whose only files are not images",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "not_images"],
     "has no images"),
    ("archive that is not an archive",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "garbage.tar.gz"],
     "cannot read archive garbage.tar.gz"),
    ("output in a missing directory",
     ["train", "--arch", "resnet20", "--data", "rgb3", "--out", "missing-dir/o.pt"],
     "output directory does not exist: missing-dir"),
    ("output path is a directory",
     ["train", "--arch", "resnet20", "--data", "rgb3", "--out", "rgb3"],
     "output path is a directory: rgb3"),
    ("safetensors checkpoint truncated",
     ["eval", "--weights", "truncated.safetensors", "--data", "rgb3"],
     "cannot read safetensors checkpoint truncated.safetensors"),
    ("--stream on an archive (streaming reads a directory)",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "garbage.tar.gz",
      "--stream"], "is not a directory"),
    ("--stream on a folder without val/ or test/",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "train_only", "--stream"],
     "expected ImageFolder splits train/ and val/ (or test/)"),
    ("export input size malformed",
     ["export", "--arch", "resnet20", "--weights", "r20.th", "--input-size", "3,x",
      "--out", "o.onnx"], "expected C,H,W like 3,32,32, got '3,x'"),
]

OUTPUTS = ("o.pt", "o.onnx", "bench")  # must never appear after a refused run


def _images(root: Path, classes: str, per_class: int = 3, size: int = 8, ext: str = "png"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    d / f"{i}.{ext}")


def make_files(d: Path) -> None:
    """Everything the cases refer to, in directory `d` (the cases run with it as cwd)."""
    from caproj.models import build_model, make_checkpoint

    torch.manual_seed(0)
    torch.save(build_model("resnet20", num_classes=3).state_dict(), d / "r20.th")
    sd = build_model("resnet20", num_classes=3).state_dict()
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, d / "nan.th")
    data = (d / "r20.th").read_bytes()
    (d / "truncated.th").write_bytes(data[: len(data) // 2])
    (d / "garbage.th").write_bytes(b"\x80\x04garbage")
    (d / "empty.th").write_bytes(b"")
    torch.save(make_checkpoint(build_model("resnet20", num_classes=100), "resnet20"),
               d / "c100.pt")
    torch.save(build_model("tv:shufflenet_v2_x0_5", num_classes=3).state_dict(),
               d / "shufflenet.th")
    (d / "garbage.tar.gz").write_bytes(b"garbage")
    _images(d / "rgb3", "abc")
    from safetensors.torch import save_file

    save_file(build_model("resnet20", num_classes=3).state_dict(), d / "r20.safetensors")
    data = (d / "r20.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "train_only" / "train" / "a").mkdir(parents=True)
    _images(d / "one_class", "a")
    _images(d / "empty_classes", "ab", per_class=0)
    for split in ("train", "test"):
        for c in "ab":
            p = d / "not_images" / split / c
            p.mkdir(parents=True)
            (p / "notes.txt").write_text("not an image")
