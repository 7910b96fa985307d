"""Write faults leave a consistent run folder: disk full, interrupted atomic writes, the umask (issue 11)."""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys

import pytest
import torch

from expcuda.train import Interrupted, metrics, train
from expcuda.train.cli import main_train
from expcuda.train.errors import WriteError
from tests.robust_helpers import error_line, fmnist_folder, tiny_config, tiny_flags, tmpfs

STEPS = 2  # steps per epoch of the tiny runs


def fill(folder, room: int) -> str:
    """Fill ``folder``'s file system but ``room`` bytes; the filler file's path."""
    path = os.path.join(folder, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if room:
        os.truncate(path, max(0, os.path.getsize(path) - room))
    return path


def step_rows(folder) -> int:
    with open(os.path.join(folder, "steps.csv")) as fh:
        return len(fh.read().splitlines()) - 1


@pytest.mark.parametrize("room", [0, 48 * 1024], ids=["full", "almost-full"])
def test_disk_full_at_a_checkpoint_keeps_the_previous_one_and_the_reports_behind_it(tmp_path, capsys, room):
    data = fmnist_folder(tmp_path / "data")
    with tmpfs(tmp_path / "fs", "size=24m") as fs:
        out = os.path.join(fs, "run")
        filler = []

        def fill_in_epoch_2(run):
            if run.global_step == STEPS + 1:
                filler.append(fill(fs, room))

        with pytest.raises(WriteError, match="checkpoint.pt") as caught:
            train(tiny_config(data, out, epochs=2), on_step=fill_in_epoch_2)
        assert "bytes free there" in str(caught.value)
        state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
        assert state["epoch"] == 1 and len(state["history"]) == 1
        assert len(metrics.read_csv(os.path.join(out, "metrics.csv"))) == 1 and step_rows(out) == STEPS
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
        assert not os.path.exists(os.path.join(out, "summary.json"))

        del caught
        gc.collect()  # torch's writer of the failed file holds its space until collected

        # the command line, disk still full: one line, exit 5, the checkpoint still the one of epoch 1
        # (which write meets the full disk first, the start-up probe or a later one, depends on the room)
        code = main_train(tiny_flags(data, out, "--epochs", "2", "--resume"))
        line = error_line(capsys.readouterr().err)
        assert code == 5 and "No space left on device" in line and f"cannot write {out}" in line
        assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1

        os.remove(filler[0])
        assert main_train(tiny_flags(data, out, "--epochs", "2", "--resume")) == 0
        assert len(metrics.read_csv(os.path.join(out, "metrics.csv"))) == 2 and step_rows(out) == 2 * STEPS


def test_reports_ahead_of_the_checkpoint_are_trimmed_on_resume(tmp_path):
    data = fmnist_folder(tmp_path / "data")
    out = tmp_path / "run"

    def stop_at(step):
        def hook(run):
            if run.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)
        return hook

    with pytest.raises(Interrupted):
        train(tiny_config(data, out, epochs=3), on_step=stop_at(STEPS + 1))
    rows = metrics.read_csv(out / "metrics.csv")
    assert len(rows) == 1
    # as a crash between the reports and the checkpoint would leave them: one epoch ahead
    metrics.write_csv(str(out / "metrics.csv"), rows + [{**rows[0], "epoch": 2}])
    with open(out / "steps.csv", "a") as fh:
        fh.write("".join(f"{i},9.0,0.5\n" for i in range(STEPS + 1, 2 * STEPS + 1)))
    with pytest.raises(Interrupted):
        train(tiny_config(data, out, epochs=3, resume=True), on_step=stop_at(STEPS + 2))
    assert [r["epoch"] for r in metrics.read_csv(out / "metrics.csv")] == [1]
    assert step_rows(out) == STEPS + 1  # the checkpoint's steps: epoch 1 and the one step of epoch 2


KILLED_WRITE = ("import os, sys\nfrom expcuda.train.atomic import atomic_path\n"
                "with atomic_path(sys.argv[1]) as tmp:\n    open(tmp, 'w').write('half')\n"
                "    os.kill(os.getpid(), 9)\n")


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    data = fmnist_folder(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.csv"):  # a real process killed inside the atomic write
        got = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out / name)], capture_output=True)
        assert got.returncode == -signal.SIGKILL
    (out / ".curves.png.k3j9x2.tmp").write_text("half")
    (out / "notes.tmp").write_text("the user's")
    leftovers = sorted(n for n in os.listdir(out) if n.startswith(".") and n.endswith(".tmp"))
    assert len(leftovers) == 3
    assert main_train(tiny_flags(data, out)) == 0
    assert not [n for n in os.listdir(out) if n.startswith(".") and n.endswith(".tmp")]
    assert (out / "notes.tmp").read_text() == "the user's"


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027])
def test_every_file_of_the_run_folder_honours_the_umask(tmp_path, mask):
    data = fmnist_folder(tmp_path / "data")
    out = tmp_path / "run"
    saved = os.umask(mask)
    try:
        assert main_train(tiny_flags(data, out)) == 0
    finally:
        os.umask(saved)
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)}
    assert {"checkpoint.pt", "metrics.csv", "steps.csv", "curves.png", "lp_model.safetensors", "lp_model.json",
            "summary.json"} <= set(modes)
    assert modes == {name: 0o666 & ~mask for name in modes}
