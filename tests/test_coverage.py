"""Coverage from real runs: one torchvision model of every layer-pattern family is compressed
through `caproj.compress` at keep=1.0 (logits equal the original's) and to 50 % of its MACs
(the compressed model runs and lands within 1 % of the target), or says why it cannot. The
docs/coverage.md's tables (every torchvision classification model, the timm list) come from the same
runs (scripts/coverage.py); the full sweep is a benchmark, these are its CI sample."""

import re
from pathlib import Path

import pytest

from caproj.coverage import classification_models, input_size_of, run

PAGE = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"  # the tables' page

# One of each pattern family, the fastest of its kind on 2 CPU cores (seconds in the table).
FAMILIES = [
    "resnet18",            # residual adds, plain bottleneck-free blocks
    "mobilenet_v2",        # inverted residuals: depthwise convs inside sites (selection)
    "mnasnet0_5",          # depthwise, another block layout
    "efficientnet_b0",     # depthwise + squeeze-excitation gates
    "mobilenet_v3_small",  # depthwise + SE with hardsigmoid, hardswish
    "regnet_x_400mf",      # grouped convs (block-diagonal P)
    "regnet_y_400mf",      # grouped convs + SE
    "resnext50_32x4d",     # 32 groups
    "densenet121",         # concatenations everywhere (only the inner 1x1 -> 3x3 pairs)
    "googlenet",           # inception branches
    "swin_t",              # Linear layers on channels-last tokens (224 px)
]
FLOOR_LIMITED = ["shufflenet_v2_x0_5", "squeezenet1_1"]  # too few MACs in sites for 0.5


@pytest.mark.parametrize("name", FAMILIES)
def test_family_compresses_for_real(name):
    c = run(f"tv:{name}", input_size_of(name))
    assert c.exact is True, c
    assert c.runs is True and c.macs_reached is not None, c
    assert abs(c.macs_reached - 0.5) <= 0.01, c
    assert c.sites > 0 and "\n" not in c.reason


def test_depthwise_and_grouped_sites_are_counted():
    mb = run("tv:mobilenet_v2")
    assert mb.selection_sites == 17 and mb.grouped_sites == 0
    rx = run("tv:regnet_x_400mf")
    assert rx.grouped_sites == rx.sites > 0


@pytest.mark.parametrize("name", FLOOR_LIMITED)
def test_floor_limited_model_says_why_in_one_line(name):
    c = run(f"tv:{name}", input_size_of(name))
    assert c.exact is True and c.macs_reached is None and c.runs is None, c
    assert "unreachable" in c.reason and "\n" not in c.reason
    assert c.floor is not None and c.floor > 0.5


def _table(marker: str) -> list[tuple[str, str, str, str]]:
    text = PAGE.read_text()
    table = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    # model | sites | exact | MACs | runs
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", table,
                      flags=re.M)
    return [r for r in rows if r[0] != "model"]  # not the header row


@pytest.mark.parametrize("marker", ["coverage-tv", "coverage-timm"])
def test_readme_tables_come_from_real_runs_and_hold(marker):
    rows = _table(marker)
    if marker == "coverage-tv":
        assert {r[0] for r in rows} == set(classification_models()), \
            "regenerate: python scripts/coverage.py --zoo tv"
    else:
        assert len(rows) >= 30
    for name, exact, macs, runs in rows:
        assert "**no**" not in exact + runs, f"{name} failed in the table's run"
        if macs.strip() not in ("–", ""):  # listed as compressing: within 2 % of the target
            assert abs(float(macs) - 0.5) <= 0.01, name
            assert runs.strip() == "yes", name
