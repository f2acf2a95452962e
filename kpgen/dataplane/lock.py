"""The writer lock: one kpgen writer at a time on a node, as the xtables lock does for iptables.

``kpgen apply``, ``kpgen cleanup`` and every sync of ``kpgen run`` read what the kernel holds,
then write a transaction built from it (which chains are stale, which jumps are missing). Two
writers interleaving those steps fail (a chain deleted twice) or leave duplicate jumps. So each
holds ``flock`` on one file under ``/run`` from its first read to its last write. The kernel
drops the lock when the holder dies, ``kill -9`` included, so a crash never wedges the node.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kpgen.dataplane.run import DataplaneError

LOCK_FILE = "/run/kpgen.lock"
WAIT = 30.0  # seconds a writer waits for another's transaction (the largest takes a few)
_POLL = 0.05


class LockTimeout(DataplaneError):
    """Another writer held the lock for longer than the wait."""


def lock_path() -> str:
    """``KPGEN_LOCK_FILE`` if set (tests, or a node whose /run is not writable), else
    /run/kpgen.lock."""
    return os.environ.get("KPGEN_LOCK_FILE") or LOCK_FILE


@contextmanager
def writer_lock(wait: float | None = None, path: str | None = None) -> Iterator[None]:
    """Hold the writer lock for the block; wait up to ``wait`` seconds for it (default:
    ``KPGEN_LOCK_WAIT`` if set, else :data:`WAIT`)."""
    path = path or lock_path()
    if wait is None:
        try:
            wait = float(os.environ.get("KPGEN_LOCK_WAIT") or WAIT)
        except ValueError:
            wait = WAIT
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise DataplaneError(f"cannot open the writer lock {path}: {error.strerror}") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise DataplaneError(f"writer lock {path}: {error.strerror}") from None
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"another kpgen writer has held {path} for more than {wait:g} s"
                    ) from None
                time.sleep(_POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
