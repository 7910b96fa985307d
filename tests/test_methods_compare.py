"""expcuda compare with every method: short real runs on a Fashion-MNIST subset, and --methods' bad input."""

from __future__ import annotations

import csv
import os

import pytest

from expcuda.cli import main
from expcuda.data.idx import DEBIAN_DIR
from expcuda.train import TrainConfig, compare, metrics

ALL = "baseline,exp,distill,exp+distill,two-stage,staircase,sp"


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_every_method_trains_and_lands_in_one_table(tmp_path, capsys):
    args = ["compare", "--width", "0.125", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32",
            "--epochs", "2", "--decay-steps", "0.5", "--w-bits", "2", "--a-bits", "1", "--seeds", "1",
            "--progressive", "bits:32,2/1", "--out", str(tmp_path), "--no-progress", "--methods", ALL]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for label in ("baseline", "EXP-Net", "distillation", "EXP-Net + distillation", "two-stage", "staircase",
                  "stochastic precision"):
        assert f"| {label} |" in printed
    with open(tmp_path / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ALL.split(",")
    assert all(float(r["wall_s"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    by = {r["method"]: r for r in rows}
    assert float(by["baseline"]["diff_vs_baseline"]) == 0.0
    staircase = metrics.read_json(tmp_path / "staircase-seed0" / "summary.json")["config"]
    assert staircase["progressive"] == "bits:32,2/1" and staircase["mode"] == "lp"
    both = metrics.read_json(tmp_path / "exp-net_distill-seed0" / "summary.json")
    assert both["config"]["mode"] == "exp" and both["config"]["distill"] == "kl"
    assert both["collapsed_test_acc"] == both["final_test_acc"] and "final_twin_test_acc" in both
    sp = metrics.read_csv(tmp_path / "sp-seed0" / "metrics.csv")
    assert sp[0]["sp_fraction"] == 1.0 and sp[-1]["stage"] is None
    two = metrics.read_csv(tmp_path / "two-stage-seed0" / "metrics.csv")
    assert [r["stage"] for r in two] == [1, 2]
    base = metrics.read_json(tmp_path / "baseline-seed0" / "summary.json")["config"]
    assert base["distill"] is None and base["progressive"] is None and base["stochastic_precision"] is None
    assert os.path.isfile(tmp_path / "curves.png") and os.path.isfile(tmp_path / "comparison.md")


def test_methods_are_checked_before_anything_trains(tmp_path):
    base = TrainConfig.from_preset("fmnist", out=str(tmp_path))
    assert [m.name for m in compare.method_configs(base, "exp")] == ["baseline", "exp"]
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        compare.method_configs(base, "baseline,exp+magic")
    with pytest.raises(ValueError, match="pick one"):
        compare.method_configs(base, "two-stage+staircase")
    with pytest.raises(ValueError, match=r"--methods staircase: --progressive bits:32,4: the last stage"):
        compare.method_configs(base, "staircase", {"progressive": "bits:32,4"})
    with pytest.raises(ValueError, match="--methods sp: --stochastic-precision P0 must be"):
        compare.method_configs(base, "sp", {"stochastic_precision": 2.0})
    assert os.listdir(tmp_path) == []


def test_default_staircase_ends_at_the_target_and_skips_binary_steps():
    cfg = TrainConfig.from_preset("fmnist")
    assert compare.default_staircase(cfg) == "bits:32,8,4,2"
    assert compare.default_staircase(cfg.replace(a_bits=1)) == "bits:32,8,4,2/1"
    assert compare.default_staircase(cfg.replace(a_quant="sign", a_bits=1, w_quant="xnor", w_bits=1)) == "bits:32,1"
    zhuang = TrainConfig.from_preset("cifar100-zhuang")
    methods = compare.method_configs(zhuang, "distill,sp")
    assert methods[0].cfg.distill is None and methods[1].cfg.distill == "kl" and methods[1].cfg.nesterov
