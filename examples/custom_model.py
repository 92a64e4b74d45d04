"""Your own CNN, your own DataLoader: compress -> fine-tune -> save -> reload into a fresh instance.

The network is in no zoo and its forward uses torch.cat and flatten; the data is a plain
DataLoader(TensorDataset(...)). Trains a few seconds first so there is something to keep.

    python examples/custom_model.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import caproj


class TwoBranchNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)  # its own bias, then a BN
        self.bn2 = nn.BatchNorm2d(64)
        self.left = nn.Conv2d(64, 16, 1)
        self.right = nn.Conv2d(64, 16, 3, padding=1)
        self.mix = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)  # two branches
        x = F.relu(self.mix(x))
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv4(x)), 2)
        return self.fc(torch.flatten(x, 1))


def make_data(n: int, seed: int) -> TensorDataset:
    """Images whose class is the brightest quadrant, plus noise: learnable in seconds."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] += 0.15
    return TensorDataset(x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    out_dir = Path(a.out_dir or tempfile.mkdtemp())
    torch.manual_seed(0)
    train = DataLoader(make_data(1024, 0), batch_size=64, shuffle=True)
    test = DataLoader(make_data(256, 1), batch_size=128)

    model = TwoBranchNet()  # the user's own training loop, as it is
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    print(f"trained: {caproj.evaluate(model, test, progress=False)['acc']:.1f} % top-1")

    res = caproj.compress(model, train, target_macs=0.5, steps=40, calib_images=512,
                          batch_size=64, progress=False)
    rep = res.report
    print(f"compressed: {rep['macs_before'] / 1e6:.2f} -> {rep['macs_after'] / 1e6:.2f} M MACs, "
          f"widths {res.widths}: {caproj.evaluate(res.model, test, progress=False)['acc']:.1f} %")
    caproj.finetune(res.model, train, epochs=1, teacher=model, progress=False)
    print(f"fine-tuned: {caproj.evaluate(res.model, test, progress=False)['acc']:.1f} %")

    path = out_dir / "two-branch-cap.pt"
    caproj.save(res.model, path, input_shape=[3, 16, 16])
    again = caproj.load(path, model=TwoBranchNet())  # a fresh instance of the user's class
    x = next(iter(test))[0]
    with torch.no_grad():
        diff = (again(x) - res.model(x)).abs().max().item()
    assert diff <= 1e-5, f"reloaded model differs by {diff}"
    print(f"saved {path}; reloaded into a fresh TwoBranchNet: max |logit diff| {diff:.1e}")


if __name__ == "__main__":
    main()
