"""A run folder belongs to one process at a time, tested with real processes (issue 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from expcuda.cli import main as expcuda_main
from expcuda.train.cli import main_train
from expcuda.train.lock import NAME, FolderLock
from tests.robust_helpers import error_line, fmnist_folder, tiny_flags

HOLD = ("import sys, time\nfrom expcuda.train.lock import FolderLock\n"
        "FolderLock(sys.argv[1], 'test holder').acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")


def wait_for_holder(folder, proc, deadline_s=180.0) -> None:
    """Until the lock file names ``proc`` (the holder writes its PID once it has the lock)."""
    path = os.path.join(folder, NAME)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if os.path.isfile(path) and open(path).read().startswith(f"{proc.pid} "):
            return
        time.sleep(0.2)
    pytest.fail(f"{proc.pid} never wrote {path}")


def stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture
def training(tmp_path):
    """A real ``python -m expcuda.train`` that holds its run folder for a long while."""
    data = fmnist_folder(tmp_path / "data")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "expcuda.train", *tiny_flags(data, out, "--epochs", "1000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(out, proc)
        yield data, out, proc
    finally:
        stop(proc)


def test_a_second_train_or_resume_on_a_busy_folder_is_refused_naming_the_holder(training):
    data, out, proc = training
    second = [subprocess.Popen([sys.executable, "-m", "expcuda.train", *tiny_flags(data, out, *extra)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for extra in (["--seed", "1"], ["--resume"])]  # at once: both wait for imports, not each other
    for other in second:
        stdout, stderr = other.communicate(timeout=300)
        line = error_line(stderr)
        assert other.returncode == 6 and f"in use by process {proc.pid} (expcuda train)" in line
        assert "epoch 1/" not in stdout  # refused before training
    assert proc.poll() is None  # the holder runs on


def test_a_killed_holder_leaves_no_stale_lock(training):
    data, out, proc = training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with FolderLock(str(out), "test"):  # taken at once: the OS dropped the dead process's lock
        assert open(out / NAME).read().startswith(f"{os.getpid()} ")


@pytest.fixture
def held(tmp_path):
    """A folder locked by another real process."""
    folder = tmp_path / "held"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(folder, proc)
        yield folder, proc
    finally:
        stop(proc)


def test_compare_on_a_busy_folder_is_refused(held, tmp_path, capsys):
    folder, proc = held
    data = fmnist_folder(tmp_path / "data")
    code = expcuda_main(["compare", "--seeds", "1", "--methods", "baseline,exp", *tiny_flags(data, folder)])
    assert code == 6 and f"process {proc.pid} (test holder)" in error_line(capsys.readouterr().err)
    assert sorted(os.listdir(folder)) == [NAME]  # no run folder, no comparison started


def test_train_in_process_on_a_busy_folder_is_refused(held, tmp_path, capsys):
    folder, proc = held
    data = fmnist_folder(tmp_path / "data")
    assert main_train(tiny_flags(data, folder)) == 6
    assert f"process {proc.pid}" in error_line(capsys.readouterr().err)
    assert sorted(os.listdir(folder)) == [NAME]

