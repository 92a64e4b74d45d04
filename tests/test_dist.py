"""torchrun: two gloo processes train (and compress) on shards of the same global batch and end
where one process does (batch statistics frozen: the same computation up to summation order)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import caproj, caproj_cmd

# gloo on the CPU, also on a GPU machine (a one-GPU machine cannot hold two CUDA ranks)
TRAIN = ["train", "--arch", "digits-cnn", "--data", "digits", "--epochs", "2", "--batch-size",
         "64", "--freeze-bn", "--no-bf16", "--threads", "1", "--device", "cpu"]


def _torchrun(*args, cwd):
    exe = caproj_cmd(*args)  # the entry point, or `python -m caproj.cli` where none is installed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *(exe[1:] if exe[0] == sys.executable else exe)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def _two_and_one(args, tmp_path):
    """The same command under torchrun (2 processes) and in one process: both checkpoints."""
    r2 = _torchrun(*args, "--out", "ddp.pt", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert r2.stdout.count("saved ddp.pt") == 1  # rank 0 alone prints and writes
    r1 = caproj(*args, "--out", "one.pt", cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr
    return (torch.load(tmp_path / "ddp.pt", weights_only=True),
            torch.load(tmp_path / "one.pt", weights_only=True))


def test_two_processes_match_one(tmp_path):
    a, b = _two_and_one(TRAIN, tmp_path)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert abs(a["metrics"]["test_acc"] - b["metrics"]["test_acc"]) < 0.5
    assert a["history"][-1]["train_loss"] < a["history"][0]["train_loss"]


def test_uneven_batch_and_single_process_commands_are_refused(tmp_path):
    r = _torchrun("train", "--arch", "digits-cnn", "--data", "digits", "--epochs", "1",
                  "--batch-size", "63", "--out", "x.pt", "--device", "cpu", cwd=tmp_path)
    assert r.returncode != 0 and "does not split evenly over 2 processes" in r.stderr
    r = _torchrun("eval", "--arch", "digits-cnn", "--data", "digits", "--weights", "x.pt",
                  cwd=tmp_path)
    assert r.returncode != 0 and "only train and compress run under torchrun" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_compress_under_torchrun_matches_one_process(trained, tmp_path):
    args = ["compress", "--weights", trained, "--data", "digits", "--target-macs", "0.5",
            "--cap-steps", "20", "--cap-batch-size", "64", "--finetune-epochs", "1",
            "--batch-size", "64", "--freeze-bn", "--no-bf16", "--no-cap-bf16", "--threads", "1",
            "--device", "cpu", "--preset", "none"]  # CaP's steps and their all-reduce, whatever
    # a preset would choose for this model (learn: no CaP steps, 622 fine-tune steps at lr
    # 0.02, where summation order moves weights by ~1e-2 however right the all-reduce is; the
    # two-process drift seen with it was match_scale behind frozen BN collapsing the network,
    # now skipped: tests/test_match_scale.py)
    a, b = _two_and_one(args, tmp_path)
    # statistics, least squares and BN re-estimation all-reduced; CaP gradients summed
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=1e-3, atol=1e-4, msg=k)
    for k in ("acc_after_compress", "acc_after_finetune"):
        assert abs(a["metrics"][k] - b["metrics"][k]) < 0.5


def test_more_cuda_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: a CaprojError naming the fix, raised
    before CUDA is touched (it used to be CUDA's 'invalid device ordinal' traceback)."""
    from caproj import dist
    from caproj.errors import CaprojError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device called"))
    with pytest.raises(CaprojError, match=r"local rank 1 .* 1 CUDA device.*nproc_per_node 1"):
        dist.init_from_env(torch.device("cuda"))
