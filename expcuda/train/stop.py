"""Ctrl-C and SIGTERM become a request to stop at the next step boundary (after a checkpoint)."""

from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """Training stopped on a signal; the checkpoint holds everything needed to ``--resume``."""

    def __init__(self, signum: int, path: str):
        self.signum, self.path = signum, path
        cause = signal.Signals(signum).name if signum else "a signal to another DDP rank"
        super().__init__(f"stopped by {cause}; checkpoint saved to {path}, continue with --resume")


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set ``signum``; a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._saved = {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved.clear()
        return False
