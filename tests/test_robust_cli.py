"""Bad flags and bad run folders: one ``error:`` line and exit 2 before any training (issue 11)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from expcuda.cli import main as expcuda_main
from expcuda.train import TrainConfig
from expcuda.train.cli import main_train
from tests.robust_helpers import error_line, fmnist_folder, tiny_flags, tmpfs

BAD_FLAGS = [
    (["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"),
    (["--limit-train", "-5"], "--limit-train"), (["--limit-test", "-1"], "--limit-test"),
    (["--limit-train", "0"], "--limit-train"), (["--workers", "-1"], "--workers"),
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "-0.1"], "--lr"), (["--lr", "0"], "--lr"),
    (["--lr", "1e300"], "--lr"),
    (["--momentum", "nan"], "--momentum"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--w-quant", "xnor", "--w-bits", "2"], "--w-bits"), (["--w-quant", "xnor", "--w-bits", "4"], "--w-bits"),
    (["--a-quant", "sign", "--a-bits", "4"], "--a-bits"), (["--a-quant", "sign", "--a-bits", "2"], "--a-bits"),
    (["--a-quant", "none", "--a-bits", "2"], "--a-bits"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--momentum", "1"], "--momentum"), (["--momentum", "2"], "--momentum"),
]


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    code = main_train(tiny_flags(tmp_path / "no-data-needed", out, *flags))
    line = error_line(capsys.readouterr().err)
    assert code == 2 and named in line
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--threads", "-2"], ["--lr", "inf"], ["--a-quant", "none", "--a-bits", "4"]])
def test_compare_refuses_the_same_flags(tmp_path, capsys, flags):
    code = expcuda_main(["compare", *tiny_flags(tmp_path / "d", tmp_path / "cmp", *flags)])
    assert code == 2 and flags[-2] in error_line(capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("quant, field, value", [("xnor", "w_bits", 1), ("sign", "a_bits", 1), ("none", "a_bits", 32)])
def test_a_quantizer_without_bit_width_records_its_own_not_the_presets(quant, field, value):
    kind = "w_quant" if field == "w_bits" else "a_quant"
    cfg = TrainConfig.from_preset("fmnist", **{kind: quant})
    assert getattr(cfg, field) == value and getattr(cfg.model_config(10, 1), field) == value


@pytest.mark.parametrize("spec, missing", [("1,99", "99"), ("99", "9"), ("7", "7"), ("2,8,9", "8, 9")])
def test_expand_layers_that_do_not_exist_are_listed_with_the_valid_ones(tmp_path, capsys, spec, missing):
    data = fmnist_folder(tmp_path / "data")
    code = main_train(tiny_flags(data, tmp_path / "run", "--expand-layers", spec))
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "--expand-layers" in line and "LP layers 1..6" in line and f"{missing} do" in line
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_expand_layers_none_in_exp_mode_says_so(tmp_path, capsys):
    data = fmnist_folder(tmp_path / "data")
    assert main_train(tiny_flags(data, tmp_path / "run", "--expand-layers", "none")) == 2
    assert "expands no layer" in error_line(capsys.readouterr().err)


def test_out_that_is_a_file_or_inside_one(tmp_path, capsys):
    data = fmnist_folder(tmp_path / "data")
    (tmp_path / "afile").write_text("mine")
    for out, words in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "run", "cannot create")):
        assert main_train(tiny_flags(data, out)) == 2
        line = error_line(capsys.readouterr().err)
        assert f"--out {out}" in line and words in line
    assert (tmp_path / "afile").read_text() == "mine"


def test_out_on_a_read_only_file_system_fails_before_training(tmp_path, capsys):
    data = fmnist_folder(tmp_path / "data")
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        for out in (os.path.join(ro, "run"), ro):  # a folder to create, and an existing one
            assert main_train(tiny_flags(data, out)) == 2
            line = error_line(capsys.readouterr().err)
            assert f"--out {out}" in line and "Read-only file system" in line


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run of 2 epochs: its checkpoint is the one the damaged copies come from."""
    root = tmp_path_factory.mktemp("finished")
    data = fmnist_folder(root / "data")
    assert main_train(tiny_flags(data, root / "run", "--epochs", "2")) == 0
    return data, root / "run"


@pytest.mark.parametrize("key", ["lr_scheduler", "history", "step_loss", "torch_rng", "world"])
def test_a_checkpoint_lacking_a_key_is_refused_by_name_and_kept(finished, tmp_path, capsys, key):
    data, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state[key]
    torch.save(state, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    assert main_train(tiny_flags(data, out, "--epochs", "2", "--resume")) == 2
    assert repr(key) in error_line(capsys.readouterr().err)
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("command", [["train"], ["compare"]])
def test_help_documents_the_exit_codes(capsys, command):
    with pytest.raises(SystemExit):
        expcuda_main([*command, "--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text
    for code, words in ((2, "bad flag"), (3, "collapsed"), (4, "non-finite"), (5, "write failed"),
                        (6, "another process"), (130, "Ctrl-C")):
        assert any(line.strip().startswith(str(code)) and words in line for line in text.splitlines()), (code, text)

