"""The container's termination message, where Kubernetes reads it (terminationMessagePath's
default): the pod's status shows it, and the operator reads it (a failed step's condition says its
error; a finished run's progress is its final step). Outside a pod there is no such file."""

from __future__ import annotations

import contextlib
from pathlib import Path

TERMINATION_LOG = Path("/dev/termination-log")


def termination_message(message: str) -> None:
    if TERMINATION_LOG.exists():
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(message)
