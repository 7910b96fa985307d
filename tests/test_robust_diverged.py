"""A diverged run stops at the non-finite step with one line and exit 4, never as a collapse failure (issue 11)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from expcuda.train import metrics, train
from expcuda.train.cli import main_train
from expcuda.train.errors import Diverged
from tests.robust_helpers import error_line, fmnist_folder, tiny_config, tiny_flags

STEPS = 2  # steps per epoch of the tiny runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fmnist_folder(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("flags", [["--lr", "1e30"], ["--optimizer", "sgd", "--lr", "1e30"],
                                   ["--baseline", "--optimizer", "sgd", "--lr", "1e38"],
                                   ["--full-precision", "--optimizer", "sgd", "--lr", "1e30", "--momentum", "0.9"]])
def test_a_run_that_diverges_stops_with_exit_4(data, tmp_path, capsys, flags):
    out = tmp_path / "run"
    code = main_train(tiny_flags(data, out, "--epochs", "3", *flags))
    line = error_line(capsys.readouterr().err)
    assert code == 4 and line.startswith("error: training diverged: the training loss is nan at epoch 1, step ")
    assert "--lr" in line and "collapse" not in line
    assert not (out / "metrics.csv").exists() and not (out / "summary.json").exists()


def poison(step: int, where):
    """An on_step hook that writes NaN into ``where(model)`` after global step ``step``."""
    def hook(run):
        if run.global_step == step:
            with torch.no_grad():
                where(run.model).fill_(float("nan"))
    return hook


def last_linear(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight


def first_bn_running_var(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0].running_var


@pytest.mark.parametrize("at_step, epoch, step", [(1, 1, 2), (STEPS + 1, 2, 2)])
def test_nan_weights_stop_at_the_next_step_and_keep_the_last_good_checkpoint(data, tmp_path, at_step, epoch, step):
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=f"training loss is nan at epoch {epoch}, step {step};") as caught:
        train(tiny_config(data, out, epochs=3), on_step=poison(at_step, last_linear))
    assert (caught.value.epoch, caught.value.step) == (epoch, step)
    if epoch == 1:
        assert "no checkpoint was written yet" in str(caught.value) and not (out / "checkpoint.pt").exists()
    else:
        assert f"the last good checkpoint {out / 'checkpoint.pt'} is kept" in str(caught.value)
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())
        assert len(metrics.read_csv(out / "metrics.csv")) == 1


def test_a_non_finite_test_loss_stops_the_run_before_its_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Diverged, match="the test loss is nan") as caught:
        train(tiny_config(data, out, epochs=3), on_step=poison(STEPS + STEPS, first_bn_running_var))
    assert caught.value.epoch == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert os.path.isfile(out / "metrics.csv") and len(metrics.read_csv(out / "metrics.csv")) == 1
