"""The methods in ``expcuda train``: exact resume in a stage / an SP run / with a twin, bad input refused."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from expcuda.data.idx import DEBIAN_DIR
from expcuda.train import CheckpointError, Interrupted, TrainConfig, metrics, train
from expcuda.train.cli import main_train

pytestmark = pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")

TINY = dict(width=0.125, limit_train=128, limit_test=64, batch_size=32, progress=False, mode="lp")
FLAGS = ["--width", "0.125", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32", "--no-progress"]


def tiny(out, **changes) -> TrainConfig:
    return TrainConfig.from_preset("fmnist", out=str(out), **{**TINY, **changes})


def interrupt_at(step):
    def hook(run):
        if run.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)
    return hook


def outcome(folder):
    rows = metrics.read_csv(os.path.join(folder, "metrics.csv"))
    with open(os.path.join(folder, "steps.csv")) as fh:
        steps = fh.read()
    files = {name: load_file(os.path.join(folder, name)) for name in ("lp_model.safetensors", "fp_model.safetensors")
             if os.path.isfile(os.path.join(folder, name))}
    keys = ("train_loss", "test_loss", "test_acc", "lr", "stage", "sp_fraction", "twin_test_acc", "twin_test_loss")
    return [[r[k] for k in keys] for r in rows], steps, files


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        assert all(torch.equal(a[2][name][k], b[2][name][k]) for k in a[2][name])


def resumed_equals_straight(tmp_path, stops, **changes):
    straight = tmp_path / "straight"
    train(tiny(straight, **changes))
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(tiny(out, **changes), on_step=interrupt_at(stops[0]))
    for stop in stops[1:]:
        with pytest.raises(Interrupted):
            train(tiny(out, resume=True, **changes), on_step=interrupt_at(stop))
    train(tiny(out, resume=True, **changes))
    reference = outcome(straight)
    assert_same(outcome(out), reference)
    return straight, reference


def test_staircase_resumed_in_the_middle_of_a_stage(tmp_path):
    # 3 stages of 1, 1, 2 epochs x 4 steps: stop inside stage 2 and inside stage 3 (at a stage boundary too)
    straight, (rows, _, files) = resumed_equals_straight(tmp_path, [6, 8, 13], progressive="bits:32,4,2", epochs=4,
                                                         w_quant="lsq", a_quant="lsq")
    assert [r[4] for r in rows] == [1, 2, 3, 3]
    for n in (1, 2, 3):
        assert os.path.isfile(straight / f"checkpoint-stage{n}.pt")
    stage1 = torch.load(straight / "checkpoint-stage1.pt", weights_only=True)
    assert stage1["epoch"] == 1 and stage1["methods"]["entered"] == 0


def test_stochastic_precision_with_a_twin_resumed_mid_run(tmp_path):
    _, (rows, steps, files) = resumed_equals_straight(tmp_path, [3, 6], stochastic_precision=0.25, epochs=2,
                                                      distill="kl", sp_reach=0.75)
    assert [r[5] for r in rows] == [pytest.approx(0.25 + 0.75 * 4 / 6), 1.0]
    assert all(r[6] is not None for r in rows) and set(files) == {"lp_model.safetensors", "fp_model.safetensors"}


def test_p0_one_through_the_loop_is_the_baseline_run(tmp_path):
    train(tiny(tmp_path / "base", epochs=1))
    train(tiny(tmp_path / "sp", epochs=1, stochastic_precision=1.0))
    (rows, steps, files), (rows_sp, steps_sp, files_sp) = outcome(tmp_path / "base"), outcome(tmp_path / "sp")
    assert steps == steps_sp and [r[:4] for r in rows] == [r[:4] for r in rows_sp]
    assert all(torch.equal(v, files_sp["lp_model.safetensors"][k]) for k, v in files["lp_model.safetensors"].items())


def test_two_stage_with_exp_net_and_a_frozen_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    assert main_train(FLAGS + ["--full-precision", "--epochs", "1", "--out", str(teacher)]) == 0
    summary = train(tiny(tmp_path / "run", mode="exp", progressive="two-stage", epochs=2, decay_steps="50%",
                         distill="mse", teacher=str(teacher), init_from=str(teacher)))
    rows = metrics.read_csv(tmp_path / "run" / "metrics.csv")
    fp_acc = metrics.read_json(teacher / "summary.json")["final_test_acc"]
    assert [r["twin_test_acc"] for r in rows] == [fp_acc, fp_acc]  # frozen
    assert summary["collapsed_test_acc"] == summary["final_test_acc"]
    assert not os.path.exists(tmp_path / "run" / "fp_model.safetensors")


@pytest.mark.parametrize("flags, message", [
    (["--progressive", "bits:2,4"], "--progressive bits:2,4: the bits must strictly descend"),
    (["--progressive", "bits:"], "the staircase is empty"),
    (["--progressive", "bits:32,x"], "'x' is not a bit-width"),
    (["--progressive", "bits:32,8"], "the last stage (8/8 bits) must be the model's W/A 2/2"),
    (["--progressive", "bits:32,2", "--w-quant", "syq", "--w-bits", "1", "--a-bits", "1"],
     "the last stage (2/2 bits) must be the model's W/A 1/1"),
    (["--progressive", "bits:32,4,2", "--w-quant", "syq"], "not supported by the --w-quant syq quantizer"),
    (["--stochastic-precision", "1.5"], "--stochastic-precision P0 must be a number in [0, 1]"),
    (["--stochastic-precision", "-0.1"], "--stochastic-precision P0 must be a number in [0, 1]"),
    (["--stochastic-precision", "0.5", "--sp-unit", "block"], "--sp-unit block needs a model with residual blocks"),
    (["--distill", "kl", "--distill-ls", "-1"], "--distill-ls must be a number >= 0"),
    (["--distill", "kl", "--distill-t", "0"], "--distill-t (the temperature) must be a number > 0"),
    (["--progressive", "two-stage", "--stochastic-precision", "0.5"], "pick one"),
    (["--full-precision", "--distill", "kl"], "--full-precision has no quantizers"),
    (["--stage-epochs", "full"], "--stage-epochs needs --progressive"),
    (["--distill", "kl", "--teacher", "/nonexistent"], "--teacher /nonexistent: not a finished full-precision"),
    (["--init-from", "/nonexistent"], "--init-from /nonexistent: no such file"),
])
def test_bad_input_names_the_flag_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main_train(FLAGS + ["--epochs", "1", "--out", str(out)] + flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_teacher_of_another_architecture_or_corrupt_and_resume_with_another_method(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert main_train(FLAGS + ["--full-precision", "--epochs", "1", "--width", "0.25", "--out", str(teacher)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main_train(FLAGS + ["--epochs", "1", "--distill", "kl", "--teacher", str(teacher), "--out", str(out)]) == 2
    assert "the teacher must be the same architecture" in capsys.readouterr().err
    assert main_train(FLAGS + ["--epochs", "1", "--width", "0.25", "--baseline", "--out", str(out)]) == 0
    (teacher / "fp_model.safetensors").write_bytes(b"\x00 not safetensors")
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()}
    assert main_train(FLAGS + ["--epochs", "1", "--width", "0.25", "--distill", "kl", "--teacher", str(teacher),
                               "--out", str(tmp_path / "run2")]) == 2
    assert "fp_model.safetensors is corrupt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"(?s)different run.*progressive: checkpoint None, now 'two-stage'"):
        train(tiny(out, width=0.25, epochs=1, resume=True, progressive="two-stage", stage_epochs="full"))
    assert {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()} == before
