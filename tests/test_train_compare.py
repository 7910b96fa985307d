"""expcuda compare: the table's arithmetic, and a tiny real comparison through the command line."""

from __future__ import annotations

import os

import pytest

from expcuda.cli import main
from expcuda.data.idx import DEBIAN_DIR
from expcuda.train import compare


def fake(acc, best=None, time=10.0):
    return {"final_test_acc": acc, "best_test_acc": best or acc, "mean_epoch_time": time, "mean_images_per_s": 100.0}


def test_table_pairs_seeds_and_says_win_or_loss():
    results = {"lp": [fake(80.0), fake(82.0)], "exp": [fake(81.0), fake(82.0)], "fp": [fake(90.0), fake(90.0)]}
    text = compare.table(results)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()[2:]}
    assert rows["baseline"][:2] == ["81.00 ± 1.41", "—"]
    assert rows["EXP-Net"][:2] == ["81.50 ± 0.71", "0.50 ± 0.71 (win, within seed noise)"]
    assert rows["full precision"][1] == "9.00 ± 1.41 (win)"
    lose = compare.table({"lp": [fake(80.0)], "exp": [fake(79.2)]})
    assert "-0.80 (loss)" in lose


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_compare_command_end_to_end(tmp_path, capsys):
    args = ["compare", "--width", "0.125", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32",
            "--epochs", "1", "--decay-steps", "0.5", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| EXP-Net |" in printed and "comparison.md" in printed
    assert sorted(p for p in os.listdir(tmp_path) if os.path.isdir(tmp_path / p)) == ["baseline-seed0", "exp-net-seed0"]
    for name in ("comparison.md", "curves.png"):
        assert os.path.isfile(tmp_path / name)
    assert os.path.isfile(tmp_path / "exp-net-seed0" / "lp_model.safetensors")
    assert main(args) == 0  # finished runs are reused, not retrained
    assert capsys.readouterr().out.count("reusing the finished run") == 2
