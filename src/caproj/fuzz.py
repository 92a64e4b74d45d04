"""Random small CNNs for property tests (tests/test_fuzz.py) and the fuzzing benchmark
(benchmarks/fuzz.py): every structure caproj claims to handle, in random combinations.

A network is a list of block specs drawn by `draw_spec(rng)`, built by `FuzzNet(spec)`:
- "conv": a conv with or without bias, plain, grouped or depthwise, with BN before or after its
  activation (or none);
- "res": two 3x3 convs with BN and a residual add;
- "cat": two branches concatenated;
- "se": a conv followed by a squeeze-excitation gate;
- "pool": a 2x2 max pool;
and a head: global average pool + flatten + Linear, or flatten of a 2x2 map + Linear.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}
WIDTHS = (4, 6, 8, 12, 16, 24)


def draw_spec(rng: random.Random, max_blocks: int = 5) -> dict[str, Any]:
    """A random network: its blocks (kind, width, options) and head."""
    blocks: list[dict[str, Any]] = []
    pools = 0
    for _ in range(rng.randint(1, max_blocks)):
        kind = rng.choice(("conv", "conv", "res", "cat", "se", "pool"))
        if kind == "pool" and pools >= 2:
            kind = "conv"
        pools += kind == "pool"
        blocks.append({"kind": kind, "width": rng.choice(WIDTHS),
                       "groups": rng.choice(("one", "one", "depthwise", "grouped")),
                       "bias": rng.random() < 0.3, "bn": rng.choice(("before", "after", "none")),
                       "act": rng.choice(tuple(ACTS)), "k": rng.choice((1, 3))})
    return {"blocks": blocks, "head": rng.choice(("avg", "avg", "flatten")),
            "classes": rng.randint(2, 10)}


class ConvBlock(nn.Module):
    def __init__(self, c: int, b: dict[str, Any]) -> None:
        super().__init__()
        w, g = b["width"], 1
        if b["groups"] == "depthwise":
            w, g = c, c
        elif b["groups"] == "grouped" and c % 2 == 0 and w % 2 == 0:
            g = 2
        self.conv = nn.Conv2d(c, w, b["k"], padding=b["k"] // 2, groups=g,
                              bias=b["bias"] or b["bn"] == "none")
        self.bn = nn.BatchNorm2d(w) if b["bn"] != "none" else nn.Identity()
        self.act = ACTS[b["act"]]()
        self.after = b["bn"] == "after"
        self.out = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(self.act(x)) if self.after else self.act(self.bn(x))


class ResBlock(nn.Module):
    def __init__(self, c: int, b: dict[str, Any]) -> None:
        super().__init__()
        mid = b["width"]
        self.c1, self.b1 = nn.Conv2d(c, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = ACTS[b["act"]]()
        self.out = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.b2(self.c2(self.act(self.b1(self.c1(x))))))


class CatBlock(nn.Module):
    def __init__(self, c: int, b: dict[str, Any]) -> None:
        super().__init__()
        w = b["width"]
        self.a = ConvBlock(c, {**b, "groups": "one", "k": 1})
        self.b = ConvBlock(c, {**b, "groups": "one", "k": 3, "width": max(2, w // 2)})
        self.out = self.a.out + self.b.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class SEBlock(nn.Module):
    def __init__(self, c: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.body = ConvBlock(c, {**b, "groups": "one"})
        w = self.body.out
        self.fc1, self.fc2 = nn.Conv2d(w, max(2, w // 4), 1), nn.Conv2d(max(2, w // 4), w, 1)
        self.out = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


BLOCKS = {"conv": ConvBlock, "res": ResBlock, "cat": CatBlock, "se": SEBlock}


class FuzzNet(nn.Module):
    """The network of a spec (`draw_spec`), for inputs of 3 x 8 x 8 or larger."""

    def __init__(self, spec: dict[str, Any], in_channels: int = 3) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        c = in_channels
        for b in spec["blocks"]:
            if b["kind"] == "pool":
                layers.append(nn.MaxPool2d(2))
                continue
            blk = BLOCKS[b["kind"]](c, b)
            layers.append(blk)
            c = blk.out
        self.body = nn.Sequential(*layers)
        if spec["head"] == "avg":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c, spec["classes"])
        else:
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(4 * c, spec["classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


def run_case(spec: dict[str, Any], seed: int = 0, size: int = 12) -> dict[str, Any]:
    """The properties on one network: `keep=1.0` gives the original logits (<= 1e-4) and
    `target_macs=0.5` gives a network that runs with its counted MACs at or below the target
    (1 % slack, as the solver allows) and equal to those the report gives, or a one-line
    CaprojError. Returns {"outcome": "ok" | "refused" | "failed", "error": ..., "where": ...};
    "failed" is a bug."""
    from caproj.api import compress
    from caproj.coverage import randomise_bn
    from caproj.errors import CaprojError
    from caproj.metrics import count_macs

    torch.manual_seed(seed)
    model = randomise_bn(FuzzNet(spec), seed)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 3, size, size, generator=g),
             torch.randint(0, spec["classes"], (8,), generator=g)) for _ in range(2)]
    x = data[0][0]
    kw = {"steps": 0, "preset": None, "calib_images": 16, "progress": False, "seed": seed}
    with torch.no_grad():
        ref = model(x)
    where = "keep=1.0"
    try:
        res = compress(model, data, keep=1.0, **kw)
        with torch.no_grad():
            err = float((res.model(x) - ref).abs().max())
        if not err <= 1e-4 * max(1.0, float(ref.abs().max())):
            return {"outcome": "failed", "where": where, "error": f"logits differ by {err:.3g}"}
        where = "target_macs=0.5"
        res = compress(model, data, target_macs=0.5, **kw)
        with torch.no_grad():
            out = res.model(x)
        macs, full = count_macs(res.model, (3, size, size)), count_macs(model, (3, size, size))
        said = res.report["macs_after"] / res.report["macs_before"]
        if out.shape != ref.shape or macs > 0.5 * 1.01 * full or abs(said - macs / full) > 1e-9:
            return {"outcome": "failed", "where": where,
                    "error": f"output {tuple(out.shape)}, MACs {macs / full:.4f} of the original "
                             f"counted, {said:.4f} reported"}
    except CaprojError as e:
        msg = str(e)
        bad = "\n" in msg or msg.startswith("internal error")
        return {"outcome": "failed" if bad else "refused", "where": where, "error": msg}
    except Exception as e:  # a traceback a user would see: a bug
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return {"outcome": "failed", "where": where, "error": f"{type(e).__name__}: {first}"}
    return {"outcome": "ok", "where": where, "error": None}
