"""The training loop on a small Fashion-MNIST subset: exact resume, checkpoint errors, export, collapse check."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import expcuda
from expcuda.data.idx import DEBIAN_DIR
from expcuda.train import CheckpointError, CollapseMismatch, Interrupted, TrainConfig, export, metrics, train
from expcuda.train.cli import main_train

pytestmark = pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")

TINY = dict(width=0.125, limit_train=256, limit_test=100, batch_size=32, epochs=2, decay_steps="50%",
            progress=False)


def tiny(out, **changes) -> TrainConfig:
    return TrainConfig.from_preset("fmnist", out=str(out), **{**TINY, **changes})


def read(folder):
    rows = metrics.read_csv(os.path.join(folder, "metrics.csv"))
    with open(os.path.join(folder, "steps.csv")) as fh:
        steps = fh.read()
    return rows, steps, load_file(os.path.join(folder, "lp_model.safetensors"))


def interrupt_at(steps: dict):
    """An on_step hook that sends this process the signal ``steps[global_step]``."""
    def hook(run):
        if run.global_step in steps:
            os.kill(os.getpid(), steps[run.global_step])
    return hook


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted tiny run: the reference for resume, and a finished run folder."""
    out = tmp_path_factory.mktemp("straight")
    summary = train(tiny(out))
    return out, summary


def test_run_folder_and_export(straight):
    out, summary = straight
    for name in ("metrics.csv", "steps.csv", "curves.png", "checkpoint.pt", "lp_model.safetensors",
                 "lp_model.json", "summary.json"):
        assert os.path.isfile(out / name), name
    rows = metrics.read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["f"] == 0.0 and rows[-1]["f"] == 0.0  # decay over 50% of 16 steps: 0 at step 8
    assert all(0 <= r["data_wait"] < 1 and r["images_per_s"] > 0 for r in rows)
    assert summary["collapsed_test_acc"] == summary["final_test_acc"] == rows[-1]["test_acc_lp"]
    with open(out / "curves.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    model = export.load(str(out / "lp_model.safetensors"), str(out / "lp_model.json"))
    assert not any(isinstance(m, expcuda.ExpandedConv2d) for m in model.modules())
    assert summary["parameters_shipped"] < summary["parameters_trained"]


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(straight, tmp_path):
    reference = read(straight[0])
    with pytest.raises(Interrupted, match="SIGINT"):
        train(tiny(tmp_path), on_step=interrupt_at({5: signal.SIGINT}))  # mid-epoch 1
    assert not os.path.exists(tmp_path / "metrics.csv")
    with pytest.raises(Interrupted, match="SIGTERM"):
        train(tiny(tmp_path, resume=True), on_step=interrupt_at({8: signal.SIGTERM}))  # end of epoch 1
    train(tiny(tmp_path, resume=True))
    rows, steps, weights = read(tmp_path)
    ref_rows, ref_steps, ref_weights = reference
    assert steps == ref_steps and len(steps.splitlines()) == 17
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_lp", "f", "lr")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in ref_rows]
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_bad_checkpoints_are_refused_and_kept(straight, tmp_path):
    out = straight[0]
    with pytest.raises(CheckpointError, match="already holds a run's checkpoint; pass --resume"):
        train(tiny(out))
    with pytest.raises(CheckpointError, match=r"(?s)different run.*lr: checkpoint 0.001, now 0.01"):
        train(tiny(out, resume=True, lr=0.01))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(tiny(tmp_path, resume=True))
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny(tmp_path, resume=True))
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"\x00garbage"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_checkpoint_from_before_a_new_field_resumes(tmp_path):
    """A TrainConfig field added after a checkpoint was written counts as its default on resume."""
    with pytest.raises(Interrupted):
        train(tiny(tmp_path), on_step=interrupt_at({5: signal.SIGINT}))
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["train_config"]["sync_bn"]  # as written before sync_bn existed
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="sync_bn: checkpoint True, now False"):
        train(tiny(tmp_path, resume=True, sync_bn=False))
    assert train(tiny(tmp_path, resume=True))["epochs"] == 2


def test_collapse_mismatch_fails_loudly(tmp_path, monkeypatch):
    real = expcuda.collapse

    def broken(model):
        model = real(model)
        with torch.no_grad():
            model.features[0].lp_bn.bias.add_(5.0)
        return model
    monkeypatch.setattr(export.expcuda, "collapse", broken)
    with pytest.raises(CollapseMismatch, match="collapse is broken"):
        train(tiny(tmp_path, epochs=1))
    assert not os.path.exists(tmp_path / "lp_model.safetensors")


def test_decay_must_end_by_the_last_step(tmp_path):
    with pytest.raises(ValueError, match="would not reach f = 0"):
        train(tiny(tmp_path, decay_steps="5"))
    cfg = tiny(tmp_path, epochs=200)
    assert cfg.decay_epochs("30") == 30 and cfg.decay_epochs("0.25") == 50 and cfg.decay_epochs("10%") == 20
    with pytest.raises(ValueError, match="decay steps must be"):
        cfg.decay_epochs("1.5")


def test_cli_baseline_with_exponential_flags(tmp_path, capsys):
    code = main_train(["--baseline", "--width", "0.125", "--limit-train", "128", "--limit-test", "50",
                       "--batch-size", "32", "--epochs", "1", "--w-bits", "1", "--a-bits", "1",
                       "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    summary = metrics.read_json(tmp_path / "run" / "summary.json")
    assert summary["mode"] == "lp" and "collapsed_test_acc" not in summary
    assert summary["config"]["w_bits"] == 1
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "img/s, data wait" in printed
    code = main_train(["--decay", "exponential", "--decay-steps", "1", "--epochs", "1", "--out", str(tmp_path / "x")])
    assert code == 2 and "would not reach f = 0" in capsys.readouterr().err


def test_imagenet_folders_train_with_top5(tmp_path):
    image = pytest.importorskip("PIL.Image")
    for split, count in (("train", 4), ("val", 2)):
        for c, cls in enumerate(("n01", "n02", "n03")):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = torch.full((60, 80, 3), 60 * c + 10 * i, dtype=torch.uint8).numpy()
                image.fromarray(pixels).save(tmp_path / "data" / split / cls / f"{i}.JPEG")
    cfg = TrainConfig.from_preset("imagenet", data_dir=str(tmp_path / "data"), model="resnet18", width=0.0625,
                                  batch_size=4, epochs=1, workers=0, out=str(tmp_path / "run"), progress=False,
                                  decay_steps="100%")
    summary = train(cfg)
    rows = metrics.read_csv(tmp_path / "run" / "metrics.csv")
    assert rows[0]["test_top5"] == 100.0  # 3 classes: the top 5 always hold the label
    assert summary["collapsed_test_acc"] == summary["final_test_acc"]


def test_async_decay_gives_the_last_layers_their_own_length():
    from expcuda import models
    from expcuda.train import build

    cfg = TrainConfig.from_preset("fmnist", width=0.125, epochs=10, decay_steps="5", async_decay=["3", "8"])
    model = models.build(cfg.model_config(10, 1))
    sched = build.make_decay(cfg, model, steps_per_epoch=4)
    for _ in range(4 * 4):  # 4 epochs: the 5-epoch layers are near 0, the 8-epoch one is not
        sched.step()
    f = list(sched.values().values())
    assert f[:4] == [f[0]] * 4 and 0 < f[0] < 0.1
    assert f[4] == 0.0 and f[5] > 0.3
    with pytest.raises(ValueError, match="would not reach f = 0"):
        build.make_decay(cfg.replace(async_decay=["11"]), model, steps_per_epoch=4)


@pytest.mark.parametrize("preset", ["svhn", "cifar10"])
def test_presets_train_from_their_file_formats(tmp_path, preset):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    if preset == "svhn":
        scipy_io = pytest.importorskip("scipy.io")
        for name, n in (("train", 64), ("test", 16)):
            scipy_io.savemat(data / f"{name}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8),
                                                          "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    else:
        root = data / "cifar-10-batches-py"
        root.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(root / name, "wb") as fh:
                pickle.dump({b"data": rng.integers(0, 256, (16, 3072)).astype(np.uint8),
                             b"labels": rng.integers(0, 10, 16).tolist()}, fh)
    cfg = TrainConfig.from_preset(preset, data_dir=str(data), width=0.125, batch_size=16, epochs=2,
                                  decay_steps="50%", out=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    assert summary["collapsed_test_acc"] == summary["final_test_acc"]
    assert summary["config"]["optimizer"] == ("adam" if preset == "svhn" else "sgd")
