"""Label-free compression: the loader yields images only (no labels). CaP's loss is then
distillation from the original plus next-layer reconstruction; labels are used only to measure.
Then data-free compression: no images at all, only ones synthesised from the model's own
BatchNorm statistics (`caproj.synthesize`, through `compress(synthetic=N)`).

    python examples/label_free.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import caproj
from caproj.models import build_model  # caproj's small demo CNN (any model works)


def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def main() -> None:
    torch.manual_seed(0)
    train, test = digits()
    model = build_model("digits-cnn", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    test_loader = DataLoader(test, batch_size=200)
    before = caproj.evaluate(model, test_loader, progress=False)["acc"]

    unlabeled = DataLoader(train.tensors[0], batch_size=64, shuffle=True)  # bare tensors
    res = caproj.compress(model, unlabeled, target_macs=0.5, steps=60, calib_images=500,
                          batch_size=64, progress=False)
    assert res.report["label_free"]
    after = caproj.evaluate(res.model, test_loader, progress=False)["acc"]
    x = test.tensors[0]
    with torch.no_grad():
        agree = (res.model(x).argmax(1) == model(x).argmax(1)).float().mean().item() * 100
    print(f"label-free CaP to {res.report['macs_after'] / res.report['macs_before']:.2f} of the "
          f"MACs: top-1 {before:.1f} -> {after:.1f} %, agreement with the original {agree:.1f} %")

    res = caproj.compress(model, synthetic=512, example_inputs=x[:1], target_macs=0.5, steps=60,
                          calib_images=512, batch_size=64, progress=False,
                          synth_options={"steps": 100, "batch_size": 256})
    df = res.report["data_free"]
    after = caproj.evaluate(res.model, test_loader, progress=False)["acc"]
    print(f"data-free CaP from {df['n']} synthetic images (BN-statistics loss "
          f"{df['bn_loss_start']:.1f} -> {df['bn_loss_end']:.1f}): top-1 {before:.1f} -> "
          f"{after:.1f} %")


if __name__ == "__main__":
    main()
