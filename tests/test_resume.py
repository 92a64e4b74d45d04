"""Runs that survive faults: kill a compress run (SIGKILL, SIGTERM) mid-way, resume it, and get
what an uninterrupted run gives; state files are refused when the settings differ."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from conftest import caproj, caproj_cmd

# Small but long enough to be caught mid-way: 400 CaP steps, then 2 short fine-tune epochs
# (with a weight EMA, so its state must survive the interruption too).
ARGS = ["--data", "digits", "--target-macs", "0.5", "--cap-steps", "400", "--cap-batch-size",
        "32", "--finetune-epochs", "2", "--batch-size", "32", "--ema", "0.9", "--save-every",
        "5", "--threads", "1"]


def _compress(trained, out, *extra):
    return caproj("compress", "--weights", trained, *ARGS, "--out", out, *extra)


def _state_step(path) -> int:
    try:
        return torch.load(path, weights_only=True)["step"]
    except Exception:  # not written yet
        return -1


def _start_and_kill(trained, out, state_suffix: str, min_step: int, sig: int):
    """Start compress, wait until its `state_suffix` file has reached `min_step`, send `sig`."""
    p = subprocess.Popen(caproj_cmd("compress", "--weights", trained, *ARGS, "--out", out),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out.parent / (out.name + state_suffix)
    deadline = time.time() + 300
    while _state_step(state) < min_step:
        assert p.poll() is None, f"run ended before it could be interrupted: {p.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err, state


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.pt"
    r = _compress(trained, out)
    assert r.returncode == 0, r.stderr
    return out


def _assert_same(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sigkill_during_cap_then_resume_matches_uninterrupted(trained, reference, tmp_path):
    out = tmp_path / "a.pt"
    rc, _, state = _start_and_kill(trained, out, ".cap-state.pt", 20, signal.SIGKILL)
    assert rc == -signal.SIGKILL and not out.exists() and state.exists()
    killed_at = _state_step(state)
    assert 20 <= killed_at < 400
    report = tmp_path / "a.json"
    r = _compress(trained, out, "--resume", "--report", report)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {state} at step {killed_at}" in r.stdout
    _assert_same(out, reference)
    rep = json.loads(report.read_text())  # the wall time counts the interrupted run's too
    t = rep["cap_timings"]
    assert t["resumed_at_step"] == killed_at and t["earlier_s"] > 0
    assert rep["compress_seconds"] > t["earlier_s"] + t["optimise_s"]
    assert not state.exists() and not list(tmp_path.glob("*state.pt"))


def test_sigterm_during_finetune_saves_state_exits_and_resumes(trained, reference, tmp_path):
    out = tmp_path / "b.pt"
    rc, err, state = _start_and_kill(trained, out, ".ft-state.pt", 10, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and not out.exists()
    r = _compress(trained, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout  # both the CaP state (finished) and the fine-tune state
    _assert_same(out, reference)


def test_state_from_other_settings_is_refused(trained, tmp_path):
    out = tmp_path / "c.pt"
    rc, _, state = _start_and_kill(trained, out, ".cap-state.pt", 5, signal.SIGKILL)
    r = caproj("compress", "--weights", trained, *ARGS, "--cap-lr", "0.002", "--out", out,
               "--resume")
    assert r.returncode == 2 and "other settings" in r.stderr and not out.exists()
    assert state.exists()  # kept for the run it belongs to
