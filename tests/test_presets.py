"""Presets: measured configurations as data, chosen from the job by rules, each rule tested, the
user's options over the preset's, every measured row backed by its JSON, and every `caproj`
command the README and docs recommend accepted by the CLI's own parser."""

from __future__ import annotations

import json
import re
import shlex
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

import caproj
from caproj.config import DEEP_BELOW, LONG_EPOCHS, PRESETS, SMALL_SET, JobFacts, choose_preset

from conftest import caproj as run_cli

ROOT = Path(__file__).resolve().parents[1]

BASE = JobFacts(depth=0.5, finetune_epochs=3, labels=True, images=50000, fits=True)


@pytest.mark.parametrize("changes, name", [
    ({}, "shallow"),
    ({"depth": DEEP_BELOW - 0.01}, "deep"),
    ({"depth": 0.125, "finetune_epochs": 15}, "deep"),  # deep wins over a long budget
    ({"finetune_epochs": LONG_EPOCHS}, "long"),
    ({"fits": False}, "learn"),
    ({"fits": False, "depth": 0.25}, "learn"),
    ({"finetune_epochs": 0}, "post-training"),
    ({"labels": False, "images": SMALL_SET}, "label-free"),
    ({"labels": False, "images": SMALL_SET, "finetune_epochs": 0}, "label-free"),
    ({"labels": False, "images": SMALL_SET + 1}, "shallow"),  # a large unlabeled set
    ({"labels": False, "images": None, "finetune_epochs": 0}, "post-training"),
    ({"target_latency": True}, "latency"),
    ({"synthetic": True, "labels": False, "images": 5000}, "data-free"),
    ({"depth": None}, "shallow"),
    ({"budget_images": 0}, "calibration"),
    ({"budget_images": 0, "labels": False, "images": 500, "finetune_epochs": 0}, "calibration"),
    ({"budget_images": 0, "synthetic": True}, "data-free"),
])
def test_each_rule_picks_its_preset(changes, name):
    import dataclasses

    got, why = choose_preset(dataclasses.replace(BASE, **changes))
    assert got == name and why


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.Conv2d(64, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _batches(net: nn.Module | None, n: int = 96, bs: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, 8, 8, generator=g)
    if net is None:
        return [xs[i:i + bs] for i in range(0, n, bs)]
    with torch.no_grad():
        ys = net(xs).argmax(1)  # labels the original fits
    return [(xs[i:i + bs], ys[i:i + bs]) for i in range(0, n, bs)]


KW = dict(calib_images=32, batch_size=16, channel_multiple=1, progress=False, log_every=0)
CAP_SHARE = 4 * 16  # CaP's default steps (4 here) x this batch: its share of the budget


def test_compress_reads_the_job_and_reports_its_preset(monkeypatch):
    import caproj.stages

    monkeypatch.setattr(caproj.stages, "CAP", caproj.CAP.replace(steps=4))  # a cheap share
    net = _net()
    data = _batches(net)
    deep = caproj.compress(net, data, target_macs=0.35, finetune=1, **KW).report
    assert deep["preset"]["name"] == "deep" and "0.350" in deep["preset"]["reason"]
    assert deep["cap_config"]["steps"] == 0 and deep["match_scale"]  # the preset's settings
    assert deep["cap_config"]["ridge_to"] == "projected"
    # the budget: CaP's share (600 steps x 16 images) moves to the fine-tuning
    assert deep["budget"] == {"images": CAP_SHARE + 96, "cap_images": 0,
                              "finetune_images": CAP_SHARE + 96}
    assert deep["finetune_config"]["max_steps"] == (CAP_SHARE + 96) // 16
    assert len(deep["finetune"]) == deep["finetune_config"]["epochs"] == 2
    keep = caproj.compress(net, data, keep=0.3, finetune=1, steps=2, **KW).report
    assert keep["preset"]["name"] == "deep"  # the depth comes from the plan's widths
    post = caproj.compress(net, data, keep=0.7, steps=2, **KW).report
    assert post["preset"]["name"] == "post-training" and "finetune" not in post
    assert post["budget"] == {"images": 32, "cap_images": 32, "finetune_images": 0}
    free = caproj.compress(net, _batches(None), keep=0.7, steps=2, **KW).report
    assert free["preset"]["name"] == "label-free" and "96 unlabeled" in free["preset"]["reason"]
    # no fine-tune budget: the share of the 2 CaP steps asked for (2 x 16 images) distils
    # from the original instead; the preset's steps=0 is overridden by steps=2
    assert free["preset"]["overridden"] == ["steps"]
    assert free["budget"] == {"images": 32, "cap_images": 32, "finetune_images": 0}
    free = caproj.compress(net, _batches(None), keep=0.7, budget_images=64, **KW).report
    assert free["cap_config"]["steps"] == 0 and free["match_scale"]
    assert free["budget"]["finetune_images"] == 64 and free["finetune_config"]["max_steps"] == 4
    assert free["finetune_config"]["kd_weight"] == 1.0
    # no training budget: calibration only, with the calibration preset's settings
    cal = caproj.compress(net, _batches(None), target_macs=0.6, budget_images=0, **KW).report
    assert cal["preset"]["name"] == "calibration" and "finetune" not in cal
    assert cal["budget"] == {"images": 0, "cap_images": 0, "finetune_images": 0}
    assert cal["cap_config"]["refit_target"] == "block" and cal["cap_config"]["damping"] == 1
    assert cal["allocation"] == "auto"
    # a preset's automatic widths spread a MACs budget: they yield to the user's keep
    # (allocation="auto" with keep is an error the user alone can make)
    kept = caproj.compress(net, _batches(None), keep=0.7, budget_images=0, **KW).report
    assert kept["preset"]["name"] == "calibration" and kept["allocation"] == "uniform"
    free = caproj.compress(net, _batches(None), target_macs=0.6, budget_images=64, **KW).report
    assert free["preset"]["name"] == "label-free" and free["allocation"] == "auto"
    assert free["cap_config"]["refit_target"] == "block" and free["cap_config"]["damage_folds"] == 2
    with pytest.raises(caproj.CaprojError, match="keep") as e:
        caproj.compress(net, _batches(None), keep=0.7, allocation="auto", **KW)
    assert e.value.param == "allocation"
    named = caproj.compress(net, _batches(None), target_macs=0.6, preset="calibration",
                            **KW).report  # by name, no budget given: it trains nothing either
    assert named["budget"]["images"] == 0 and "finetune" not in named


def test_the_users_options_override_the_preset():
    net = _net()
    data = _batches(net)
    rep = caproj.compress(net, data, target_macs=0.35, finetune={"epochs": 1, "lr": 0.001},
                          match_scale=False, steps=2, **KW).report
    assert rep["preset"]["name"] == "deep"
    assert rep["preset"]["overridden"] == ["lr", "match_scale", "steps"]
    assert not rep["cap_config"]["match_scale"] and "match_scale" not in rep
    assert rep["cap_config"]["steps"] == 2 and rep["finetune_config"]["lr"] == 0.001
    assert rep["cap_config"]["ridge_to"] == "projected"  # what was not overridden stays
    # the budget follows: CaP's steps spend their share, the fine-tuning gets the epoch
    assert rep["budget"]["cap_images"] == 32 and rep["budget"]["finetune_images"] == 96
    named = caproj.compress(net, data, keep=0.7, finetune=1, preset="deep",
                            method="l1", steps=2, **KW).report
    assert named["method"] == "l1" and named["preset"]["overridden"] == ["method", "steps"]
    assert named["budget"]["cap_images"] == 0  # l1 runs no CaP steps
    plain = caproj.compress(net, data, target_macs=0.35, finetune=1, preset=None, steps=2,
                            **KW).report
    assert plain["preset"]["name"] is None and plain["finetune_config"]["epochs"] == 1
    assert plain["finetune_config"]["lr"] == caproj.FINETUNE.lr
    with pytest.raises(caproj.CaprojError, match="budget_images") as e:
        caproj.compress(net, data, keep=0.7, finetune=1, budget_images=10, steps=2,
                        **KW)
    assert e.value.param == "budget_images"


def _final_acc(d: dict, m) -> float:
    if "rows" in d:  # benchmarks/mobilenet_imagenet.py: caproj's row at the preset's target
        return next(r["top1"] for r in d["rows"]
                    if r["method"] == "caproj" and r["target"] == m.target_macs)
    for k in ("acc_final", "acc_after_ft", "acc_after_finetune"):
        if k in d:
            return d[k]
    if "cap" in d and isinstance(d["cap"], dict):
        return d["cap"]["acc_after_ft"]
    return d.get("acc_before_ft", d.get("acc_after_compress"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_presets_measured_row_is_its_json(name):
    """`caproj presets` prints these rows: each one's JSON files exist under benchmarks/out/,
    and the mean ± std of their final accuracies is the row's."""
    m = PRESETS[name].measured
    assert m.json and all(p.startswith("benchmarks/out/") for p in m.json)
    accs = [_final_acc(json.loads((ROOT / p).read_text()), m) for p in m.json]
    assert len(accs) == len(m.seeds)
    assert statistics.mean(accs) == pytest.approx(m.acc, abs=0.006)
    if m.std is not None:
        assert statistics.stdev(accs) == pytest.approx(m.std, abs=0.006)


def test_presets_command_lists_every_preset_with_its_row(tmp_path):
    r = run_cli("presets")
    assert r.returncode == 0, r.stderr
    for name, p in PRESETS.items():
        assert f"\n{name}\n" in f"\n{r.stdout}" and p.measured.row() in r.stdout
    r = run_cli("presets", "--json")
    assert set(json.loads(r.stdout)) == set(PRESETS)


SUBCOMMANDS = "info|eval|train|compress|presets|bench|export|demo"


def _recommended_commands() -> list[tuple[str, str]]:
    """Every `caproj ...` command in README.md and docs/*.md (continuation lines joined,
    comments dropped); placeholders written as `...` are skipped."""
    out = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        lines = f.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip().lstrip("$ ")
            m = re.match(rf"`?(caproj (?:{SUBCOMMANDS})(?:\s.*|$))", line)
            if m and not line.startswith("caproj:"):
                cmd = m.group(1)
                while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
                cmd = cmd.split("`")[0].split(" #")[0].strip()
                if "..." not in cmd and "<" not in cmd:
                    out.append((f.name, cmd))
            i += 1
    return out


def test_every_recommended_command_parses():
    from caproj.cli import build_parser

    cmds = _recommended_commands()
    assert len(cmds) >= 5
    bad = []
    for where, cmd in cmds:
        try:
            build_parser().parse_args(shlex.split(cmd)[1:])
        except SystemExit as e:
            if e.code != 0:
                bad.append(f"{where}: {cmd}")
    assert not bad, bad


@pytest.mark.parametrize("name", ["deep", "shallow", "learn"])
def test_the_deep_recipe_is_what_its_cells_ran(name):
    """The cells behind the deep, shallow and learn presets' rows ran the preset's own CaP
    settings (their bench method spec parses to them; cp is CaP with no steps)."""
    from caproj.bench import parse_method

    p = PRESETS[name]
    want = {k: v for k, v in p.cap if k != "steps"}
    assert dict(p.cap)["steps"] == 0
    for path in p.measured.json:
        spec = parse_method(json.loads((ROOT / path).read_text())["method"])
        assert spec.name == "cp" and spec.cap == want, path


@pytest.mark.parametrize("name", ["label-free"])
def test_the_label_free_recipe_is_what_its_cells_ran(name):
    """The cells behind the label-free preset's row (benchmarks/defaults.py through
    `caproj.compress`) ran its CaP, fine-tuning and allocation settings, whatever the preset
    was when they ran: the JSON records the settings as run."""
    p = PRESETS[name]
    for path in p.measured.json:
        d = json.loads((ROOT / path).read_text())
        assert d["preset"]["name"] == name, path
        assert {k: d["cap_config"][k] for k, _ in p.cap} == dict(p.cap), path
        assert {k: d["finetune_config"][k] for k, _ in p.finetune} == dict(p.finetune), path
        ran = d.get("allocation") or d["options"].get("allocation", "uniform")
        assert ran == dict(p.compress)["allocation"], path
