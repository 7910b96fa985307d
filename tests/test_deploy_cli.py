"""``expcuda export RUN_DIR`` and ``expcuda bench-infer RUN_DIR``."""

from __future__ import annotations

import os

import pytest
import torch

import expcuda
from expcuda import cli
from expcuda.train.export import export as export_run
from tests import deploy_helpers as h


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as ``expcuda train`` leaves it: lp_model.safetensors + lp_model.json."""
    folder = str(tmp_path_factory.mktemp("run"))
    model = h.calibrated(0.125, w_bits=1, a_bits=1)
    export_run(model, model.config, folder, "lp_model")
    return folder


def _inputs(n=16):
    return torch.randn(n, 1, 40, 40, generator=torch.Generator().manual_seed(5))


def test_export_writes_the_packed_file_and_prints_sizes(run_dir, capsys):
    assert cli.main(["export", run_dir]) == 0
    out = capsys.readouterr().out
    path = os.path.join(run_dir, "lp_model.packed.safetensors")
    assert f"packed: {path}: {os.path.getsize(path)} bytes" in out and "x smaller" in out
    from expcuda.deploy.cli import load_collapsed
    model = load_collapsed(run_dir)
    packed = expcuda.load_packed(path)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(packed(x).argmax(1), model(x).argmax(1))


def test_export_fp16_and_out(run_dir, tmp_path, capsys):
    assert cli.main(["export", run_dir]) == 0
    out = str(tmp_path / "small.safetensors")
    assert cli.main(["export", run_dir, "--fp16", "--out", out]) == 0
    assert f"packed: {out}" in capsys.readouterr().out
    assert expcuda.load_packed(out).config["float_dtype"] == "float16"
    assert os.path.getsize(out) < os.path.getsize(os.path.join(run_dir, "lp_model.packed.safetensors"))


def test_export_onnx(run_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = str(tmp_path / "m.safetensors")
    assert cli.main(["export", run_dir, "--onnx", "--out", out]) == 0
    text = capsys.readouterr().out
    onnx_path = str(tmp_path / "m.onnx")
    assert os.path.isfile(onnx_path) and f"onnx: {onnx_path}" in text and "8/8 same predictions" in text


@pytest.mark.parametrize("make", ["missing", "empty", "no-json", "corrupt", "a-file"])
def test_a_run_folder_without_a_collapsed_model(run_dir, tmp_path, capsys, make):
    folder = tmp_path / "run"
    if make != "missing" and make != "a-file":
        folder.mkdir()
    if make == "no-json":
        (folder / "lp_model.safetensors").write_bytes(open(os.path.join(run_dir, "lp_model.safetensors"), "rb").read())
    if make == "corrupt":
        (folder / "lp_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        (folder / "lp_model.json").write_text(open(os.path.join(run_dir, "lp_model.json")).read())
    if make == "a-file":
        folder.write_text("x")
    before = sorted(os.listdir(folder)) if folder.is_dir() else None
    assert cli.main(["export", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err
    expected = {"missing": "is not a folder", "a-file": "is not a folder", "empty": "has no collapsed model",
                "no-json": "lp_model.json missing", "corrupt": "cannot load the collapsed model"}[make]
    assert expected in err
    if before is not None:
        assert sorted(os.listdir(folder)) == before  # nothing written
    assert cli.main(["bench-infer", str(folder), "--min-time", "0.01"]) == 2


def test_a_failed_write_is_exit_5_and_leaves_the_target(run_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("kept")
    assert cli.main(["export", run_dir, "--out", str(target)]) == 5
    assert f"cannot write {target}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["taken"] and (target / "inside").read_text() == "kept"  # no temp file left


def test_bench_infer_prints_both_models_at_both_batches(run_dir, capsys):
    assert cli.main(["bench-infer", run_dir, "--min-time", "0.01", "--batches", "1,4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[-3].isdigit()]
    assert [(r[0], r[-3]) for r in rows] == [("collapsed", "1"), ("packed", "1"), ("collapsed", "4"), ("packed", "4")]
    assert all(float(r[-2]) > 0 and float(r[-1]) > 0 for r in rows)


def test_bench_infer_bad_flags(run_dir, capsys):
    assert cli.main(["bench-infer", run_dir, "--batches", "0"]) == 2
    assert "--batches must be" in capsys.readouterr().err
    assert cli.main(["bench-infer", run_dir, "--min-time", "0"]) == 2
    assert "--min-time must be > 0" in capsys.readouterr().err


def test_usage_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "export" in out and "bench-infer" in out


def test_gops_counts_the_multiply_accumulates():
    from expcuda.deploy.bench import ops_per_image
    model = h.calibrated(0.125)
    with torch.no_grad():
        conv = model.stem[0]
        z = conv(torch.zeros(1, 1, 40, 40))
        want = z.numel() * conv.in_channels * 25  # the stem conv, counted before its pool
        z = model.stem(torch.zeros(1, 1, 40, 40))
        for block in model.features:
            c = block.lp_conv
            out = torch.nn.functional.conv2d(z, c.weight, None, c.stride, c.padding)
            want += out.numel() * c.in_channels * c.kernel_size[0] * c.kernel_size[1]
            z = block(z)
    want += model.fc.in_features * model.fc.out_features
    assert ops_per_image(model, (1, 40, 40)) == 2 * want
