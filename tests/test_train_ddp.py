"""DDP: a 2-process gloo run (torchrun) against a single process with the same global batch.

Both see the same global batches and step f identically, so the f and LR
columns must be equal and the weights equal on both ranks (the run checks
that itself every epoch). The losses agree only closely, not exactly:
BatchNorm normalises each rank's half batch with its own statistics
(PyTorch's SyncBatchNorm is GPU-only), where one process uses the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from expcuda.data.idx import DEBIAN_DIR
from expcuda.train import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--width", "0.125", "--limit-train", "512", "--limit-test", "200", "--batch-size", "64",
         "--epochs", "2", "--decay-steps", "50%", "--no-progress", "--threads", "1"]


def run(args, out):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args, *FLAGS, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    steps = [float(line.split(",")[1]) for line in open(out / "steps.csv").read().splitlines()[1:]]
    return done.stdout, metrics.read_csv(out / "metrics.csv"), steps


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_two_gloo_ranks_match_one_process(tmp_path):
    log, ddp_rows, ddp_steps = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                    "-m", "expcuda.train"], tmp_path / "ddp")
    _, one_rows, one_steps = run(["-m", "expcuda.train"], tmp_path / "one")
    assert "global batch 64, 2 ranks" in log
    assert log.count("epoch 2/2") == 1  # only rank 0 logs
    assert len(ddp_steps) == len(one_steps) == 16
    assert [(r["f"], r["lr"]) for r in ddp_rows] == [(r["f"], r["lr"]) for r in one_rows]
    # the first step starts from the same weights on the same 64 images: only BN's batch split differs
    assert abs(ddp_steps[0] - one_steps[0]) < 0.06
    assert sum(abs(a - b) for a, b in zip(ddp_steps, one_steps)) / 16 < 0.06
    assert abs(ddp_rows[-1]["train_loss"] - one_rows[-1]["train_loss"]) < 0.06
    assert os.path.isfile(tmp_path / "ddp" / "lp_model.safetensors")
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "ddp"))  # no temp files left
