"""The command line, as a user runs it: exit codes, one-line errors, files written or not."""

import json
import os
import re

import pytest
import torch

from caproj.config import PRESETS
from caproj.errors import CaprojError

from conftest import CIFAR_ARCHIVE, MODELS, caproj, caproj_cmd, needs_cifar, needs_models


def test_readme_demo_command():
    r = caproj("demo")
    assert r.returncode == 0, r.stderr
    acc = [float(v) for v in re.findall(r"([\d.]+)%", r.stdout)]
    assert "trained digits-cnn" in r.stdout and "CaP to 50 % MACs" in r.stdout
    assert acc[0] > 90 and acc[1] > 90  # the compressed net still reads digits
    assert re.search(r"MACs\s+1\.79 M\s+0\.8\d M\s+2\.0\dx", r.stdout)


def test_train_writes_a_checkpoint_that_eval_reads(trained):
    ck = torch.load(trained, weights_only=True)
    assert ck["arch"] == "digits-cnn" and ck["seed"] == 0 and "caproj_version" in ck
    r = caproj("eval", "--weights", trained, "--data", "digits")
    assert r.returncode == 0, r.stderr
    acc = float(re.search(r"top-1 ([\d.]+) %", r.stdout).group(1))
    assert acc == pytest.approx(ck["metrics"]["test_acc"], abs=0.01) and acc > 80


def test_train_few_steps_on_tiny_image_folder(tmp_path, image_folder):
    out = tmp_path / "r20.pt"
    r = caproj("train", "--arch", "resnet20", "--data", image_folder, "--epochs", "1",
               "--batch-size", "4", "--max-steps", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert torch.load(out, weights_only=True)["num_classes"] == 3


def test_compress_round_trips_through_eval(trained, tmp_path):
    out = tmp_path / "small.pt"
    r = caproj("compress", "--weights", trained, "--data", "digits", "--keep", "0.5",
               "--cap-steps", "10", "--cap-batch-size", "64", "--calib-images", "300",
               "--finetune-epochs", "1", "--batch-size", "64", "--out", out)
    assert r.returncode == 0, r.stderr
    ck = torch.load(out, weights_only=True)
    assert ck["compressed"] and ck["metrics"]["widths"] == [16, 32, 32]
    r2 = caproj("eval", "--weights", out, "--data", "digits")
    assert r2.returncode == 0, r2.stderr
    acc = float(re.search(r"top-1 ([\d.]+) %", r2.stdout).group(1))
    assert acc == pytest.approx(ck["metrics"]["acc_after_finetune"], abs=0.01)
    info = caproj("info", "--weights", out)
    assert "(compressed)" in info.stdout and "params: 0.01" in info.stdout


def test_compress_takes_the_deep_target_remedies_as_flags(trained, tmp_path):
    out = tmp_path / "deep.pt"
    r = caproj("compress", "--weights", trained, "--data", "digits", "--keep", "0.5",
               "--cap-steps", "0", "--calib-images", "300", "--ridge-to", "projected",
               "--ridge", "0.1", "--match-scale", "--feature-weight", "1", "--kd", "0.5",
               "--finetune-epochs", "1", "--max-steps", "3", "--batch-size", "64",
               "--latency", "none", "--out", out)
    assert r.returncode == 0, r.stderr
    ck = torch.load(out, weights_only=True)
    assert ck["train_config"]["feature_weight"] == 1.0
    cfg = ck["metrics"]["cap_config_requested"]
    assert cfg["ridge_to"] == "projected" and cfg["ridge"] == 0.1 and cfg["match_scale"]
    r = caproj("compress", "--weights", trained, "--data", "digits", "--ridge", "-1",
               "--out", tmp_path / "bad.pt")
    assert r.returncode == 2 and "ridge" in r.stderr and not (tmp_path / "bad.pt").exists()


def test_compress_picks_its_preset_and_flags_override_it(trained, tmp_path):
    base = ["compress", "--weights", trained, "--data", "digits", "--keep", "0.5",
            "--cap-steps", "2", "--calib-images", "300", "--finetune-epochs", "1",
            "--max-steps", "2", "--batch-size", "64", "--latency", "none"]
    r = caproj(*base, "--out", tmp_path / "auto.pt")
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / "auto.pt", weights_only=True)
    chosen = ck["metrics"]["preset"]
    assert chosen["name"] in ("shallow", "learn", "deep")
    assert f"preset {chosen['name']}" in r.stdout  # the choice and its reason are printed
    want = dict(PRESETS[chosen["name"]].finetune)
    assert (ck["train_config"]["lr"], ck["train_config"]["kd_weight"]) == \
        (want["lr"], want["kd_weight"])
    r = caproj(*base, "--preset", "learn", "--kd", "0.3", "--cap-kd", "0.2", "--method", "cap",
               "--out", tmp_path / "learn.pt")
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / "learn.pt", weights_only=True)
    assert ck["metrics"]["preset"]["name"] == "learn"
    assert (ck["train_config"]["lr"], ck["train_config"]["kd_weight"]) == \
        (dict(PRESETS["learn"].finetune)["lr"], 0.3)
    assert ck["metrics"]["cap_config"]["kd"] == 0.2  # --cap-kd: CaP's, --kd: fine-tuning's
    r = caproj(*base, "--preset", "fast", "--out", tmp_path / "bad.pt")
    assert r.returncode == 2 and "--preset" in r.stderr and not (tmp_path / "bad.pt").exists()
    # --method runs another method under the same preset; --preset none: plain defaults
    r = caproj(*base, "--method", "l1", "--preset", "none", "--out", tmp_path / "l1.pt")
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / "l1.pt", weights_only=True)
    assert ck["metrics"]["method"] == "l1" and ck["metrics"]["preset"]["name"] is None


def test_info_resnet56_numbers():
    r = caproj("info", "--arch", "resnet56")
    assert "MACs: 125.49 M" in r.stdout and "params: 0.853 M" in r.stdout


def test_read_only_output_directory(tmp_path, trained):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        r = caproj("train", "--weights", trained, "--data", "digits", "--out", ro / "x.pt")
        assert r.returncode == 2 and "not writable" in r.stderr
    finally:
        ro.chmod(0o700)


@needs_cifar
@needs_models
@pytest.mark.parametrize("name, acc", [
    ("resnet20-12fca82f", 81.03), ("resnet20-cifar10jpeg", 88.25),
    ("resnet56-4bfd9763", 83.20), ("resnet56-cifar10jpeg", 89.95),
])
def test_eval_reproduces_published_jpeg_accuracy(name, acc):
    r = caproj("eval", "--arch", name.split("-")[0], "--weights", MODELS / f"{name}.th",
               "--data", CIFAR_ARCHIVE)
    assert r.returncode == 0, r.stderr
    assert float(re.search(r"top-1 ([\d.]+) %", r.stdout).group(1)) == pytest.approx(acc, abs=0.05)


def test_bench_writes_cells_table_plot_and_resumes(trained, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--weights", trained, "--data", "digits", "--methods", "cap,l1,svd",
            "--targets", "0.5", "--cap-steps", "5", "--finetune-epochs", "1", "--max-steps", "3",
            "--batch-size", "64", "--out-dir", out]
    r = caproj(*args)
    assert r.returncode == 0, r.stderr
    cells = sorted(p.name for p in out.glob("*.json"))
    assert cells == ["cap-0.5.json", "l1-0.5.json", "svd-0.5.json"]
    table = (out / "results.md").read_text()
    assert table.count("| 0.5 |") == 3 and "1 epoch(s)" in table and "onnxruntime" in table
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    import json

    cap = json.loads((out / "cap-0.5.json").read_text())
    svd = json.loads((out / "svd-0.5.json").read_text())
    for c in (cap, svd):
        assert abs(c["macs"] / c["macs_original"] - 0.5) <= 0.005
        assert c["seed"] == 0 and "command" in c and c["latency_b1_speedup"] > 0
        assert c["latency_onnxruntime_b64_speedup"] > 0  # timed in onnxruntime beside PyTorch
    # the factorised model keeps full-width activations plus its extra rank-r maps
    assert svd["peak_activation_bytes"] >= cap["peak_activation_bytes"]
    before = (out / "l1-0.5.json").read_text()
    (out / "cap-0.5.json").unlink()  # as if the run had been killed during this cell
    r2 = caproj(*args)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("not recomputed") == 2 and (out / "cap-0.5.json").is_file()
    assert (out / "l1-0.5.json").read_text() == before
    # a cell written before a recipe option existed still counts (the option at its default)
    cell = json.loads(before)
    del cell["finetune_config"]["ema"]
    (out / "l1-0.5.json").write_text(json.dumps(cell))
    assert caproj(*args).stdout.count("not recomputed") == 3
    # a finished cell is never mixed into a table fine-tuned with another recipe
    r3 = caproj(*args, "--lr", "0.05")
    assert r3.returncode == 2 and "another recipe" in r3.stderr


def test_bench_cell_stopped_part_way_resumes_to_the_same_result(trained, tmp_path):
    """SIGTERM inside a cell leaves its resumable state beside the cell file; the next run
    continues from it and ends exactly where an uninterrupted run ends. --no-latency: no
    latency fields in the cell, dashes in the table."""
    import json
    import signal
    import subprocess
    import time

    args = ["bench", "--weights", trained, "--data", "digits", "--methods", "cap", "--targets",
            "0.5", "--cap-steps", "150", "--finetune-epochs", "2", "--batch-size", "64",
            "--no-latency", "--threads", "1"]
    out = tmp_path / "stopped"
    p = subprocess.Popen(caproj_cmd(*args, "--out-dir", out), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("*state.pt")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 128 + signal.SIGTERM
    assert list(out.glob("cap-0.5.*state.pt")) and not (out / "cap-0.5.json").exists()
    r = caproj(*args, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout + r.stderr and not list(out.glob("*state.pt"))
    whole = caproj(*args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    a = json.loads((out / "cap-0.5.json").read_text())
    b = json.loads((tmp_path / "whole" / "cap-0.5.json").read_text())
    assert a["widths"] == b["widths"]
    assert (a["acc_before_ft"], a["acc_after_ft"]) == (b["acc_before_ft"], b["acc_after_ft"])
    assert not any(k.startswith("latency") for k in a)
    assert "| – | – | – |" in (out / "results.md").read_text()


def test_bench_seeds_and_equal_compute_give_every_method_the_same_images(trained, tmp_path):
    import json

    out = tmp_path / "deep"
    args = ["bench", "--weights", trained, "--data", "digits", "--no-latency", "--methods",
            "cap,l1",
            "--targets", "0.5", "--cap-steps", "5", "--finetune-epochs", "1", "--batch-size",
            "64", "--seeds", "0,1", "--equal-compute", "--out-dir", out]
    r = caproj(*args[:-4], "0", *args[-3:])  # seed 0 now, seed 1 in a later run
    assert r.returncode == 0, r.stderr
    r = caproj(*args[:-4], "1", *args[-3:])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("not recomputed") == 0 and "from earlier runs" in r.stderr + r.stdout
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["cap-0.5-s0-eq.json", "cap-0.5-s1-eq.json", "l1-0.5-s0-eq.json",
                     "l1-0.5-s1-eq.json"]
    cells = {n: json.loads((out / n).read_text()) for n in names}
    for n, c in cells.items():
        for key in ("arch", "method", "target", "seed", "acc_before_ft", "acc_after_ft",
                    "train_images", "finetune_epochs", "command"):
            assert key in c, (n, key)
        assert c["seed"] == int(n.split("-s")[1][0]) and c["equal_compute"]
    cap, l1 = cells["cap-0.5-s0-eq.json"], cells["l1-0.5-s0-eq.json"]
    assert cap["compress_images"] == 5 * 128 and l1["compress_images"] == 0
    # the same total: pruning's fine-tuning is extended by CaP's optimisation images
    assert cap["train_images"] == l1["train_images"]
    assert l1["finetune_images"] == cap["finetune_images"] + 5 * 128
    assert l1["finetune_epochs"] > cap["finetune_epochs"] == 1
    # seeds differ (CaP's steps and fine-tuning see other batches), the table gives mean ± std
    assert cells["cap-0.5-s1-eq.json"]["acc_after_ft"] != cap["acc_after_ft"] or \
        cells["cap-0.5-s1-eq.json"]["finetune_history"] != cap["finetune_history"]
    table = (out / "results.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| 0.5 |")]
    assert len(rows) == 2 and all(ln.count(" ± ") == 2 and "(2)" in ln for ln in rows)
    assert "the same training images" in table
    r2 = caproj(*args)
    assert r2.returncode == 0 and r2.stdout.count("not recomputed") == 4
    # a cell fine-tuned with another recipe in the same folder stays out of this table
    r3 = caproj("bench", "--weights", trained, "--data", "digits", "--no-latency",
                "--methods", "svd",
                "--targets", "0.5", "--finetune-epochs", "1", "--max-steps", "2",
                "--batch-size", "64", "--lr", "0.05", "--seeds", "0", "--equal-compute",
                "--out-dir", out)
    assert r3.returncode == 0, r3.stderr
    assert "4 cells" in r3.stdout + r3.stderr and "another recipe" in r3.stdout + r3.stderr
    rows = [ln for ln in (out / "results.md").read_text().splitlines()
            if ln.startswith("| 0.5 |")]
    assert len(rows) == 1 and "svd" in rows[0]


def test_bench_method_options_and_a_folders_budget(trained, tmp_path):
    """A preset's options as method options spelled as compress's flags (the refit toward
    W P, match-scale), at equal compute; a later run with other methods keeps the folder's
    budget; unknown options and bad values fail before any work."""
    import json

    from caproj.bench import parse_method

    spec = parse_method("cp:ridge-to=projected:ridge=0.1:match-scale:lr=0.02:cap-lr=0.001"
                        ":allocation=auto")
    assert (spec.name, spec.cap, spec.finetune, spec.compress) == (
        "cp", {"ridge_to": "projected", "ridge": 0.1, "match_scale": True, "lr": 0.001},
        {"lr": 0.02}, {"allocation": "auto"})
    with pytest.raises(CaprojError, match=r"unknown option 'prog'"):
        parse_method("cap:prog")
    with pytest.raises(CaprojError, match="ridge_to must be"):
        parse_method("cap:ridge-to=far")
    r = caproj("bench", "--methods", "cap:ridge=-1", "--weights", trained, "--data", "digits",
               "--out-dir", tmp_path / "bad")
    assert r.returncode == 2 and "ridge" in r.stderr and not (tmp_path / "bad").exists()
    r = caproj("bench", "--methods", "cp:refit=false", "--weights", trained, "--data",
               "digits", "--no-latency", "--finetune-epochs", "0", "--out-dir", tmp_path / "fx")
    assert r.returncode == 2 and "cp fixes refit to True" in r.stderr  # not silently run with it
    cp = "cp:ridge-to=projected:ridge=0.1:match-scale"
    name = cp.replace(":", "+")
    out = tmp_path / "options"
    common = ["--weights", trained, "--data", "digits", "--targets", "0.25", "--cap-steps",
              "4", "--finetune-epochs", "2", "--batch-size", "64", "--seeds", "0",
              "--equal-compute", "--no-latency", "--out-dir", out]
    r = caproj("bench", "--methods", f"cap,{cp}", *common)
    assert r.returncode == 0, r.stderr
    cells = {m: json.loads((out / f"{m}-0.25-s0-eq.json").read_text()) for m in ("cap", name)}
    assert cells["cap"]["compress_images"] == 4 * 128
    assert cells[name]["compress_images"] == 0
    assert cells[name]["match_scale"]
    # each cell records the settings it ran with (the cell's options; cp's own steps = 0)
    assert cells[name]["cap_config"]["ridge_to"] == "projected"
    assert cells[name]["cap_config"]["steps"] == 0 and cells["cap"]["cap_config"]["steps"] == 4
    budget = {c["train_images"] for c in cells.values()}
    assert len(budget) == 1  # the same images for every row
    # a later run without a CaP method keeps the folder's budget (CaP's steps included)
    r = caproj("bench", "--methods", "l1", *common)
    assert r.returncode == 0, r.stderr
    l1 = json.loads((out / "l1-0.25-s0-eq.json").read_text())
    assert {l1["train_images"]} == budget and l1["compress_images"] == 0


def test_bench_fine_tunes_with_kd_from_the_original(trained, tmp_path):
    out = tmp_path / "bench"
    r = caproj("bench", "--weights", trained, "--data", "digits", "--no-latency", "--methods", "l1",
               "--targets", "0.5", "--finetune-epochs", "1", "--max-steps", "3", "--kd", "0.5",
               "--freeze-bn", "--ema", "0.9", "--batch-size", "64", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    import json

    cell = json.loads((out / "l1-0.5.json").read_text())
    assert cell["finetune_config"]["kd_weight"] == 0.5 and cell["finetune_config"]["freeze_bn"]
    table = (out / "results.md").read_text()
    assert "KD 0.5 from the original" in table and "weight EMA 0.9" in table
    raw = cell["finetune_history"][-1]["test_acc_raw"]
    assert f"{cell['acc_after_finetune']:.2f} (raw {raw:.2f})" in table


def test_bench_rejects_bad_targets_and_methods(trained, tmp_path):
    r = caproj("bench", "--weights", trained, "--data", "digits", "--targets", "0.5,2",
               "--out-dir", tmp_path / "b")
    assert r.returncode == 2 and "(0, 1], got 2.0" in r.stderr
    r = caproj("bench", "--weights", trained, "--data", "digits", "--methods", "cap,magic",
               "--out-dir", tmp_path / "b")
    assert r.returncode == 2 and "unknown method 'magic'" in r.stderr
    assert not (tmp_path / "b").exists()  # refused before any work or output


def test_unwritable_output_directory_is_refused_before_work(tmp_path, monkeypatch):
    from caproj import utils
    from caproj.errors import CaprojError

    real = os.access
    monkeypatch.setattr(utils.os, "access",
                        lambda p, mode: False if mode == os.W_OK else real(p, mode))
    with pytest.raises(CaprojError, match="output directory is not writable"):
        utils.atomic_save({"a": 1}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_failing_latency_report_keeps_the_saved_model(trained, tmp_path, monkeypatch, capsys):
    """An optional measurement never sinks a finished run: every latency form fails here (as
    ONNX export fails for AlexNet/VGG at 64 px), the model is saved anyway, with its weights."""
    from caproj import cli, deploy
    from caproj.data import Batches, load_data
    from caproj.models import load_model
    from caproj.train import evaluate

    def boom(*a, **k):
        raise RuntimeError("adaptive_avg_pool2d, output size that are not factor of input size")

    monkeypatch.setattr(deploy, "for_inference", boom)
    out = tmp_path / "o.pt"
    rc = cli.main(["compress", "--weights", str(trained), "--data", "digits", "--target-macs",
                   "0.5", "--cap-steps", "3", "--calib-images", "200", "--cap-batch-size", "64",
                   "--latency", "full", "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert not list(tmp_path.glob("*state*"))
    ck = torch.load(out, weights_only=True)
    notes = ck["metrics"]["latency_notes"]
    assert len(notes) == 4 and all("not factor of input size" in n for n in notes)
    assert "latency form skipped" in capsys.readouterr().out
    model, _ = load_model(out)
    acc = evaluate(model, Batches.test_of(load_data("digits")))["acc"]
    assert acc == ck["metrics"]["acc_after_compress"]  # the saved weights are the result's


def test_compress_label_free_flag_records_it(trained, tmp_path):
    out = tmp_path / "lf.pt"
    r = caproj("compress", "--weights", trained, "--data", "digits", "--target-macs", "0.5",
               "--cap-steps", "3", "--calib-images", "200", "--cap-batch-size", "64",
               "--finetune-epochs", "1", "--label-free", "--latency", "none", "--out", out)
    assert r.returncode == 0, r.stderr
    m = torch.load(out, weights_only=True)["metrics"]
    assert m["label_free"] is True and "acc_after_finetune" in m
    assert "batch acc" not in r.stdout and "train acc" not in r.stdout  # no labels were read


def test_widths_from_a_report_rebuild_the_same_network(trained, tmp_path):
    common = ["--weights", trained, "--data", "digits", "--cap-steps", "0", "--calib-images",
              "200", "--latency", "none", "--channel-multiple", "1"]
    first, again = tmp_path / "first.json", tmp_path / "again.json"
    r = caproj("compress", *common, "--target-macs", "0.4", "--allocate", "auto",
               "--out", tmp_path / "a.pt", "--report", first)
    assert r.returncode == 0, r.stderr
    widths = json.loads(first.read_text())["widths"]
    r = caproj("compress", *common, "--widths-from", first, "--out", tmp_path / "b.pt",
               "--report", again)
    assert r.returncode == 0, r.stderr
    assert json.loads(again.read_text())["widths"] == widths
    assert torch.load(tmp_path / "b.pt", weights_only=True)["metrics"]["widths"] == widths
