"""Stop training cleanly on Ctrl-C (SIGINT) or SIGTERM, with a checkpoint to resume from.

Inside :func:`stop_requests` the first SIGINT or SIGTERM only raises a flag: the trainer finishes
the iteration it is in, saves a checkpoint (identical to a periodic one, so ``--resume`` continues
the same trajectory) and raises :class:`TrainingInterrupted`. A second SIGINT stops at once,
without saving.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; the CLI exits with 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return SIGNAL_NAMES.get(self.signum, str(self.signum))


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Turn SIGINT / SIGTERM into a :class:`StopRequest` flag while the block runs (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {sig: signal.signal(sig, handle) for sig in SIGNAL_NAMES}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_sigint_in_worker(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which stops after the iteration."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
