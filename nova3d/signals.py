"""SIGTERM and SIGINT end a command with one line and a non-zero status, like any other error.

Without this, SIGTERM during a fit exits 0 with no message (Lightning turns it into a bare
`SIGTERMException`, a SystemExit with no code) and Ctrl-C prints Lightning's shutdown chatter.
`interrupts_as_errors()` installs handlers that raise `Interrupted` (a Nova3DError) where the
program is; it unwinds like any error, so every staged result (nova3d.atomic) is dropped, never
moved in, and the CLI prints `<prog>: error: interrupted by SIGTERM` and exits 128 + the signal's
number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process a signal ended.
Lightning's own SIGTERM handler, installed during `fit`, calls the one it finds, so this one
still runs inside a fit.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from nova3d.errors import Nova3DError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Nova3DError):
    """A signal ended the command; `exit_code` is 128 + its number."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}; nothing was moved into the output")


def _raise(signum: int, _frame) -> None:
    for s in SIGNALS:  # a second signal while unwinding must not interrupt the clean-up
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_as_errors() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise Interrupted (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_code(err: BaseException, default: int = 2) -> int:
    """The status a command exits with for `err`: 128 + signal for Interrupted, else `default`."""
    return getattr(err, "exit_code", default)
