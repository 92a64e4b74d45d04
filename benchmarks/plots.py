"""The README's and the docs' two plots, regenerated from the stored bench cells (JSON):

- accuracy against MACs: caproj's best measured configuration per depth against Torch-Pruning,
  before and after fine-tuning (ResNet-56, equal training images, mean ± std over seeds);
- accuracy against training images spent (the anytime curve): the test accuracy after
  compression and after each fine-tune epoch, at 25 % MACs.

    python benchmarks/plots.py            # writes docs/img/accuracy_vs_macs.png, anytime.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"

# (label, cell-name prefix, folder) per depth; caproj's rows are the `deep` / `shallow`
# presets' measured configurations, Torch-Pruning's its best measured lr (RESULTS.md, "After
# fine-tuning"; at 50 % its three lr-0.02 seeds ran on an H200, one folder each)
SERIES = {
    "caproj (preset)": {0.5: ("cp+match-scale+ridge-to=projected+ridge=0.1-0.5-s",
                              "factored/r56-0.5-lr0.02-cpu"),
                        0.25: ("cp+prior+rescale-0.25-s", "deep/r56-0.25-lr0.02"),
                        0.125: ("cp+rescale-0.125-s", "deep/r56-0.125-lr0.02")},
    "Torch-Pruning (tp-l2)": {0.5: ("r56-tp-0.5-lr0.02-s*/tp-l2-0.5-s", "factored/h200-grid"),
                              0.25: ("tp-l2-0.25-s", "deep/r56-0.25-lr0.02"),
                              0.125: ("tp-l2-0.125-s", "deep/r56-0.125-lr0.02")},
}
ANYTIME = {  # 25 % MACs, every seed of each
    "CaP, 600 steps + 3 epochs": "cap-0.25-s",
    "CaP + match_scale": "cap+rescale-0.25-s",
    "caproj deep preset (no CaP steps)": "cp+prior+rescale-0.25-s",
    "Torch-Pruning": "tp-l2-0.25-s",
}


def cells(folder: str, prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((OUT / folder).glob(f"{prefix}*-eq.json"))]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def finish(fig, ax, path: Path, xlabel: str, title: str) -> None:
    """The two plots' common axes, legend and file."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 95)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_macs(path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, per_depth), color in zip(SERIES.items(), ("tab:blue", "tab:red"), strict=True):
        for key, style, when in (("acc_before_ft", "--", "before FT"),
                                 ("acc_after_ft", "-", "after 3 FT epochs' images")):
            xs, ys, es = [], [], []
            for depth, (prefix, folder) in sorted(per_depth.items()):
                vals = [c[key] for c in cells(folder, prefix)]
                if vals:
                    m, s = mean_std(vals)
                    xs.append(depth)
                    ys.append(m)
                    es.append(s)
            ax.errorbar(xs, ys, yerr=es, fmt="o" + style, color=color, capsize=3,
                        label=f"{label}, {when}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([0.125, 0.25, 0.5], ["12.5 %", "25 %", "50 %"])
    finish(fig, ax, path, "MACs kept (ResNet-56, CIFAR-10; original 89.95 %)",
           "caproj against Torch-Pruning, equal training images (3 seeds)")


def anytime(path: Path, folder: str = "deep/r56-0.25-lr0.02") -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, prefix in ANYTIME.items():
        runs = cells(folder, prefix)
        if not runs:
            continue
        curves = []
        for c in runs:
            per_epoch = c["finetune_steps"] / max(len(c["finetune_history"]), 1)
            batch = c["finetune_images"] / max(c["finetune_steps"], 1)
            xs = [c["compress_images"]] + [
                c["compress_images"] + min((i + 1) * per_epoch, c["finetune_steps"]) * batch
                for i in range(len(c["finetune_history"]))]
            ys = [c["acc_before_ft"]] + [h["test_acc"] for h in c["finetune_history"]]
            curves.append((xs, ys))
        xs = curves[0][0]
        ys = [statistics.fmean(v) for v in zip(*(y for _, y in curves), strict=True)]
        ax.plot([x / 1000 for x in xs], ys, "o-", label=f"{label} (n={len(curves)})")
    finish(fig, ax, path, "training images spent, thousands (CaP's steps + fine-tuning)",
           "ResNet-56 at 25 % MACs: accuracy against training images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "img"))
    a = ap.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accuracy_vs_macs(out / "accuracy_vs_macs.png")
    anytime(out / "anytime.png")
    print(f"wrote {out / 'accuracy_vs_macs.png'} and {out / 'anytime.png'}")


if __name__ == "__main__":
    main()
