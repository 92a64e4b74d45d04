"""torchvision coverage: one model of every family compresses exactly at keep=1.0 or is refused
with a one-line reason; the README's table (a real run over every model, written by
scripts/torchvision_coverage.py) lists every classification model and none is inexact."""

import re
from pathlib import Path

import pytest

from caproj.coverage import check, classification_models

README = Path(__file__).resolve().parents[1] / "README.md"

# One of each pattern family; the full sweep (~8 min here) is the README table's job.
FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small",
            "regnet_y_400mf", "resnet18", "resnet50", "squeezenet1_1", "vit_b_32"]
REFUSED = ["resnext50_32x4d", "regnet_x_400mf", "shufflenet_v2_x0_5"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_compresses_exactly_at_keep_one(name):
    c = check(name)
    assert c.exact is True, c
    assert c.sites > 0 and 0 < c.macs_half < 1


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_family_is_refused_naming_layer_and_pattern(name):
    c = check(name)
    assert c.exact is None and c.sites == 0
    assert "grouped/depthwise conv" in c.reason and "\n" not in c.reason
    assert re.search(r"e\.g\. \S+", c.reason)  # names a layer


def test_readme_table_covers_every_model_and_none_is_inexact():
    text = README.read_text()
    table = text.split("<!-- coverage:start -->")[1].split("<!-- coverage:end -->")[0]
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| (yes|refused|\*\*no\*\*)", table, flags=re.M)
    assert {name for name, _ in rows} == set(classification_models()), \
        "regenerate: python scripts/torchvision_coverage.py"
    assert all(status != "**no**" for _, status in rows)
