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
      "--cap-lr", "-1", "--out", "o.pt"], "--cap-lr must be a finite number >= 0"),
    ("unknown architecture",
     ["info", "--arch", "resnet57"], "unknown architecture 'resnet57'"),
    ("unknown torchvision model",
     ["info", "--arch", "tv:resnet999"], "unknown torchvision classification model"),
    ("target below the floor of layers it cannot narrow",
     ["compress", "--arch", "tv:shufflenet_v2_x0_5", "--weights", "shufflenet.th", "--data",
      "rgb3", "--out", "o.pt"],
     "--target-macs 0.5 is unreachable: the narrowest allowed sizes still cost"),
    ("--keep 0", ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
                  "--keep", "0", "--out", "o.pt"], "must be in (0, 1], got 0"),
    ("--keep 1.5", ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
                    "--keep", "1.5", "--out", "o.pt"], "must be in (0, 1], got 1.5"),
    ("--keep nan", ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
                    "--keep", "nan", "--out", "o.pt"], "must be in (0, 1], got nan"),
    ("--widths-from a file that is not JSON",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--widths-from", "garbage.th", "--out", "o.pt"],
     "--widths-from: cannot read 'garbage.th' as JSON"),
    ("--widths-from a JSON file that is not a compress report",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--widths-from", "metrics.json", "--out", "o.pt"],
     "--widths-from: 'metrics.json' holds no per-site widths"),
    ("--widths-from the report of another network",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--widths-from", "other-report.json", "--out", "o.pt"],
     "widths has 3 entries for 9 sites"),
    ("--target-latency together with --target-macs",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--target-latency", "0.5", "--target-macs", "0.5", "--out", "o.pt"],
     "argument --target-macs: not allowed with argument --target-latency"),
    ("--runtime unknown",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--target-latency", "0.5", "--runtime", "tensorrt", "--out", "o.pt"],
     "argument --runtime: invalid choice: 'tensorrt'"),
    ("--target-latency below what narrowing can reach (measured latency model)",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--target-latency", "0.01", "--out", "o.pt"],
     "--target-latency 0.01 is unreachable: the narrowest allowed sizes still cost"),
    ("--target-macs unreachable",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--target-macs", "0.0001", "--out", "o.pt"], "target-macs 0.0001 is unreachable"),
    ("--epochs -1", ["train", "--arch", "resnet20", "--data", "rgb3", "--epochs", "-1",
                     "--out", "o.pt"], "--epochs must be an integer >= 0, got -1"),
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
    ("checkpoint with an Inf inside",
     ["eval", "--arch", "resnet20", "--weights", "inf.th", "--data", "rgb3"],
     "tensor 'linear.bias' has 1 non-finite value(s) (NaN/Inf)"),
    ("folder with only val/ where a train split is required (no --split)",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "val_only",
      "--out", "o.pt"], "holds only val/ (no train/ and test/ pair): pass --split N"),
    ("--split on a folder that has train/ and test/",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3", "--split",
      "4", "--out", "o.pt"], "--split N is for a folder with only one of them"),
    ("--split leaves nothing to evaluate",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "val_only",
      "--split", "9", "--out", "o.pt"], "--split N must leave images on both sides of 9, got 9"),
    ("a corrupt image inside a folder",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "corrupt",
      "--out", "o.pt"], "cannot decode image train/b/1.png"),
    ("an input size the model cannot take",
     ["compress", "--arch", "tv:alexnet", "--weights", "alexnet.th", "--data", "rgb3",
      "--out", "o.pt"], "AlexNet cannot run on inputs of shape (3, 8, 8)"),
    ("--split with --stream", ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data",
                               "val_only", "--stream", "--split", "4"],
     "--split N reads the folder into memory; it does not apply with --stream"),
    ("accuracy asked of unlabeled images",
     ["eval", "--arch", "resnet20", "--weights", "r20.th", "--data", "unlabeled:rgb3"],
     "rgb3 holds unlabeled images: measuring accuracy needs labelled data"),
    ("--eval-data without labels",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "rgb3",
      "--eval-data", "unlabeled:rgb3", "--out", "o.pt"],
     "--eval-data unlabeled:rgb3 holds unlabeled images: accuracy needs labelled ones"),
    ("--data synthetic:0",
     ["compress", "--arch", "resnet20", "--weights", "r20.th", "--data", "synthetic:0",
      "--out", "o.pt"], "--data synthetic:0: expected synthetic:N with N >= 1 images"),
    ("synthetic data outside compress",
     ["train", "--arch", "resnet20", "--data", "synthetic:100", "--out", "o.pt"],
     "--data synthetic:N is for compress (data-free compression); train needs real images"),
    ("data-free compression of a model without BatchNorm",
     ["compress", "--arch", "tv:alexnet", "--weights", "alexnet.th", "--data", "synthetic:8",
      "--input-size", "3,64,64", "--out", "o.pt"],
     "the model has no BatchNorm layer that tracks them"),
]

# Bad inputs to the library: (what is wrong, a call raising CaprojError, part of the message,
# the parameter the error names). Used by tests/test_bad_inputs.py and the docs table.


def _tiny():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _batches(n=2, size=12):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 4, (4,), generator=g))
            for _ in range(n)]


class _DictOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _tiny()

    def forward(self, x):
        return {"logits": self.body(x)}


class _Grouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from torch import nn

        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 3, groups=4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean((2, 3))


def _compress(model, data, **kw):
    import caproj

    return caproj.compress(model, data, progress=False, **kw)


API_CASES = [
    ("model whose forward returns a dict (no output_transform)",
     "compress(DictOut(), data, target_macs=0.5)",
     lambda: _compress(_DictOut(), _batches(), target_macs=0.5),
     "the model returns dict, not a tensor of logits", "output_transform"),
    ("model is not an nn.Module", "compress(lambda x: x, data)",
     lambda: _compress(lambda x: x, _batches()), "model must be an nn.Module", "model"),
    ("data is not an iterable of batches", "compress(model, 5)",
     lambda: _compress(_tiny(), 5), "data must be an iterable of batches", "data"),
    ("an unknown CaP option", "compress(model, data, bogus=1)",
     lambda: _compress(_tiny(), _batches(), bogus=1), "unknown CapConfig option 'bogus'",
     "bogus"),
    ("target_macs and keep together", "compress(model, data, target_macs=0.5, keep=0.5)",
     lambda: _compress(_tiny(), _batches(), target_macs=0.5, keep=0.5),
     "give one of target_macs, keep, target_latency, not target_macs and keep", "keep"),
    ("target_latency out of range", "compress(model, data, target_latency=1.5)",
     lambda: _compress(_tiny(), _batches(), target_latency=1.5),
     "target_latency must be a number in (0, 1], got 1.5", "target_latency"),
    ("width that splits a grouped conv unevenly", "compress(grouped, data, widths=[6])",
     lambda: _compress(_Grouped(), _batches(), widths=[6]),
     "width 6 for a is not a multiple of its 4 groups", "widths"),
    ("data-free without an input shape", "compress(model, synthetic=100)",
     lambda: __import__("caproj").compress(_tiny(), synthetic=100, progress=False),
     "synthetic=N needs example_inputs=...", "example_inputs"),
    ("real data and synthetic together", "compress(model, data, synthetic=100)",
     lambda: _compress(_tiny(), _batches(), synthetic=100),
     "give data (real images) or synthetic=N (data-free), not both", "synthetic"),
    ("neither data nor synthetic", "compress(model)",
     lambda: __import__("caproj").compress(_tiny(), progress=False),
     "data is required", "data"),
    ("a number of synthetic images below 1", "synthesize(model, 0, (3, 12, 12))",
     lambda: __import__("caproj").synthesize(_tiny(), 0, (3, 12, 12)),
     "the number of synthetic images must be an integer >= 1, got 0", "synthetic"),
    ("an unknown synthesis option", "synthesize(model, 8, (3, 12, 12), bogus=1)",
     lambda: __import__("caproj").synthesize(_tiny(), 8, (3, 12, 12), bogus=1),
     "unknown SynthConfig option 'bogus'", "bogus"),
    ("images too small for the model",
     "compress(torchvision.models.alexnet(), 16x16 images)",
     lambda: _compress(__import__("torchvision").models.alexnet(), _batches(1, 16),
                       target_macs=0.5),
     "AlexNet cannot run on inputs of shape (3, 16, 16)", "example_inputs"),
    ("a generator as data (used up by its first pass)", "compress(model, (b for b in batches))",
     lambda: _compress(_tiny(), (b for b in _batches()), target_macs=0.5),
     "data must be re-iterable", "data"),
    ("labels outside the model's classes", "finetune(model, labels 0..41, epochs=1)",
     lambda: __import__("caproj").finetune(_tiny(), [(x, y + 38) for x, y in _batches()],
                                           epochs=1, progress=False),
     "labels must be class indices in [0, 4) for a model with 4 outputs", "data"),
    ("NaN in the input images", "finetune(model, images with NaN, epochs=1)",
     lambda: __import__("caproj").finetune(
         _tiny(), [(x.fill_(float("nan")), y) for x, y in _batches()], epochs=1,
         progress=False), "the input batch at step 0 holds NaN or infinite values", "data"),
    ("fractional fine-tune epochs", "finetune(model, data, epochs=0.5)",
     lambda: __import__("caproj").finetune(_tiny(), _batches(), epochs=0.5, progress=False),
     "epochs must be an integer >= 0, got 0.5", "epochs"),
    ("a dict batch without the input key", "compress(model, [{'img': x, 'labels': y}])",
     lambda: _compress(_tiny(), [{"img": x, "labels": y} for x, y in _batches()]),
     "a dict batch needs its inputs under 'pixel_values' or 'image'", "input_key"),
]

OUTPUTS = ("o.pt", "o.onnx", "bench")  # must never appear after a refused run


def _images(root: Path, classes: str, per_class: int = 3, size: int = 8, ext: str = "png",
            splits: tuple[str, ...] = ("train", "test")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
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
    (d / "metrics.json").write_text('{"acc": 91.2}')
    (d / "other-report.json").write_text('{"widths": [8, 16, 32]}')
    torch.save(make_checkpoint(build_model("resnet20", num_classes=100), "resnet20"),
               d / "c100.pt")
    torch.save(build_model("tv:shufflenet_v2_x0_5", num_classes=3).state_dict(),
               d / "shufflenet.th")
    sd = build_model("resnet20", num_classes=3).state_dict()
    sd["linear.bias"][1] = float("inf")
    torch.save(sd, d / "inf.th")
    torch.save(build_model("tv:alexnet", num_classes=3).state_dict(), d / "alexnet.th")
    _images(d / "val_only", "abc", splits=("val",))
    _images(d / "corrupt", "ab")
    (d / "corrupt" / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
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
