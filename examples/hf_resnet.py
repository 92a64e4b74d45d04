"""A Hugging Face `transformers` CNN as users hold it: its own class, dict batches
({"pixel_values", "labels"}), a ModelOutput instead of a tensor. Compressed to half its MACs,
fine-tuned for an epoch, saved, then reloaded into a fresh instance of its own class.
Random weights from a config (no hub access here); with `from_pretrained` the code is the same.

    python examples/hf_resnet.py [--model resnet|convnext]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

import caproj

MODELS = {  # small configs so the example runs in seconds on a CPU
    "resnet": (ResNetForImageClassification, ResNetConfig(
        num_labels=10, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
        layer_type="basic")),  # ResNet-18's layout, narrower
    "convnext": (ConvNextForImageClassification, ConvNextConfig(
        num_labels=10, hidden_sizes=[24, 48, 96, 192], depths=[1, 1, 2, 1])),
}


def logits(out):
    return out["logits"]  # a ModelOutput; the key also reads a plain dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet")
    a = ap.parse_args()
    cls, config = MODELS[a.model]
    torch.manual_seed(0)
    model = cls(config).eval()
    # Batches as a Hugging Face collator gives them: caproj reads "pixel_values" and "labels"
    # by default (`input_key=` / `target_key=` for other names).
    batches = [{"pixel_values": torch.randn(16, 3, 64, 64),
                "labels": torch.randint(0, 10, (16,))} for _ in range(4)]

    res = caproj.compress(model, batches, target_macs=0.5, steps=10, calib_images=64,
                          batch_size=16, output_transform=logits, progress=False)
    epochs = caproj.finetune(res.model, batches, epochs=1, lr=0.01, teacher=model,
                          output_transform=logits, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"hf-{a.model}-cap.pt"
        caproj.save(res.model, path)
        fresh = caproj.load(path, model=cls(config))  # a fresh instance of its own class
    x = batches[0]["pixel_values"]
    with torch.no_grad():
        diff = (logits(fresh(x)) - logits(res.model.eval()(x))).abs().max().item()
    assert isinstance(fresh, cls) and diff <= 1e-5, f"reloaded logits differ by {diff}"
    rep = res.report
    print(f"{cls.__name__}: {len(res.sites)} sites, "
          f"{rep['macs_before'] / 1e6:.1f} -> {rep['macs_after'] / 1e6:.1f} M MACs "
          f"({rep['macs_after'] / rep['macs_before']:.3f}); fine-tuned 1 epoch "
          f"(train loss {epochs[-1]['train_loss']:.3f}); reloaded into a fresh {cls.__name__} "
          f"(max logit diff {diff:.1e})")


if __name__ == "__main__":
    main()
