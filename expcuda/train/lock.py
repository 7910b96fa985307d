"""One run per run folder: an exclusive ``flock`` on ``<folder>/.lock``, held for the whole run.

The OS drops the lock when the process ends, however it ends (kill -9
included), so a dead run never leaves a stale lock (at most a stale file,
which the next run locks as usual). A second process asking for a busy
folder is refused at once, with the holder's PID, which the holder writes
into the lock file. A run that ends normally removes the file.
"""

from __future__ import annotations

import fcntl
import os
import time

from expcuda.train.errors import FolderBusy

NAME = ".lock"


class FolderLock:
    """``with FolderLock(folder, "expcuda train"):`` holds ``folder`` (which must exist) or raises FolderBusy;
    ``with`` on an acquired lock just releases it at the end."""

    def __init__(self, folder: str, what: str = "expcuda"):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, NAME)
        self.fd = None

    def acquire(self) -> "FolderLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise FolderBusy(f"{self.folder} is in use by {holder}; wait for it to end, or pick another "
                                 f"--out (nothing was written)") from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a file its holder removed on release: take the current one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.what}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order, so a waiter never keeps a removed file)."""
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass  # gone, or a read-only folder: the lock is released all the same
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _holder(fd: int) -> str:
    """'process 1234 (expcuda train)' from the lock file; the holder may still be writing it."""
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            pid, _, what = text.partition(" ")
            return f"process {pid}" + (f" ({what})" if what else "")
        time.sleep(0.01)
    return "another process (its PID is not written yet)"


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
