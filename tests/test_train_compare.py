"""expcuda compare: the table's arithmetic, and a tiny real comparison through the command line."""

from __future__ import annotations

import os

import pytest

from expcuda.cli import main
from expcuda.data.idx import DEBIAN_DIR
from expcuda.train import compare


def fake(acc, best=None, time=10.0):
    return {"final_test_acc": acc, "best_test_acc": best or acc, "mean_epoch_time": time, "mean_images_per_s": 100.0}


def test_table_pairs_seeds_and_gives_the_interval_in_words():
    results = {"baseline": [fake(80.0), fake(82.0), fake(81.0)], "exp": [fake(81.0), fake(82.0), fake(81.5)],
               "fp": [fake(90.0), fake(91.0), fake(90.0)], "sp": [fake(79.0), fake(81.0), fake(80.2)]}
    labels = {"baseline": "baseline", "exp": "EXP-Net", "fp": "full precision", "sp": "stochastic precision"}
    text = compare.table(results, labels)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()[2:]}
    assert rows["baseline"][:4] == ["81.00 ± 1.00", "—", "—", "—"]
    # EXP-Net's paired differences 1, 0, 0.5: mean 0.5, sd 0.5, t(0.975, 2) = 4.303
    assert rows["EXP-Net"][1:4] == ["0.50 ± 0.50", "[-0.74, +1.74]", "no difference shown: the 95% interval includes 0"]
    assert rows["full precision"][3] == "better than the baseline: the 95% interval excludes 0"
    assert rows["stochastic precision"][3] == "worse than the baseline: the 95% interval excludes 0"
    one = compare.table({"baseline": [fake(80.0)], "exp": [fake(79.2)]}, labels)
    assert "-0.80 | — | one seed: no interval" in one


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_compare_command_end_to_end(tmp_path, capsys):
    args = ["compare", "--width", "0.125", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32",
            "--epochs", "1", "--decay-steps", "0.5", "--seeds", "1", "--out", str(tmp_path), "--no-progress",
            "--methods", "exp"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| EXP-Net |" in printed and "comparison.md" in printed
    assert sorted(p for p in os.listdir(tmp_path) if os.path.isdir(tmp_path / p)) == ["baseline-seed0", "exp-net-seed0"]
    for name in ("comparison.md", "comparison.csv", "curves.png"):
        assert os.path.isfile(tmp_path / name)
    assert os.path.isfile(tmp_path / "exp-net-seed0" / "lp_model.safetensors")
    assert main(args) == 0  # finished runs are reused, not retrained
    assert capsys.readouterr().out.count("reusing the finished run") == 2
    assert main(args[:-2] + ["--methods", "exp", "--a-bits", "2"]) == 2  # not with other settings
    assert "is a finished run with other settings (a_bits: 1 there, 2 now)" in capsys.readouterr().err
