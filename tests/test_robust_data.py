"""Labels outside the classes are refused at load, naming the file, before any training (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest

from expcuda import data as data_mod
from expcuda.data import DataError
from expcuda.data.idx import FILES, load_fashion_mnist
from expcuda.train.cli import main_train
from tests.robust_helpers import N_TEST, N_TRAIN, error_line, fmnist_folder, tiny_flags


def labels(n: int, bad: dict) -> np.ndarray:
    out = np.arange(n) % 10
    for i, v in bad.items():
        out[i] = v
    return out


CASES = [("test", {5: 12}, "label 12 at index 5"), ("test", {0: 255, 7: 10}, "label 255 at index 0 (and 1 more"),
         ("train", {N_TRAIN - 1: 10}, f"label 10 at index {N_TRAIN - 1}"), ("train", {3: 11}, "label 11 at index 3")]


@pytest.mark.parametrize("split, bad, words", CASES)
def test_labels_out_of_range_are_refused_at_load_naming_the_file(tmp_path, split, bad, words):
    n = N_TRAIN if split == "train" else N_TEST
    folder = fmnist_folder(tmp_path / "d", **{f"{split}_labels": labels(n, bad)})
    with pytest.raises(DataError, match="expected labels in 0..9") as caught:
        load_fashion_mnist(folder)
    assert FILES[f"{split}_labels"] in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize("split, bad, words", CASES[:2] + CASES[2:3])
def test_the_command_line_refuses_them_before_training(tmp_path, capsys, split, bad, words):
    n = N_TRAIN if split == "train" else N_TEST
    folder = fmnist_folder(tmp_path / "d", **{f"{split}_labels": labels(n, bad)})
    code = main_train(tiny_flags(folder, tmp_path / "run"))
    captured = capsys.readouterr()
    assert code == 2 and words in error_line(captured.err)
    assert "epoch 1/1" not in captured.out and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("limits", [dict(limit_train=-5), dict(limit_test=-1), dict(limit_train=0),
                                    dict(limit_test=True)])
def test_data_load_refuses_limits_that_are_not_positive(tmp_path, limits):
    folder = fmnist_folder(tmp_path / "d")
    with pytest.raises(ValueError, match=f"{next(iter(limits))} must be a positive int"):
        data_mod.load("fmnist", folder, size=40, **limits)
