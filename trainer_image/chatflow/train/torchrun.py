"""torchrun, with the exit status a PyTorchJob's restart policy needs: `python -m
chatflow.train.torchrun ARGS` in pods (the operator's command), and `chatflow train` locally.

torchrun turns a SIGTERM (a deleted or preempted pod, a suspended job) into an exception and
exits 1, and it exits 1 when one of its workers stopped for preemption too: the ExitCode policy
would take either for a permanent failure. So torchrun runs as a child here; SIGTERM and SIGINT
are passed on (its workers save a checkpoint and exit), and when a worker says it stopped for
preemption (the file PREEMPTED_MARK names) this exits PREEMPTED, which the policy restarts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PREEMPTED = 128 + signal.SIGTERM  # a retryable exit code for the PyTorchJob's restart policy
PREEMPTED_MARK = "CHATFLOW_PREEMPTED_MARK"  # the file a worker creates when it stops to resume


def mark_preempted() -> None:
    """Called by a worker that saved a checkpoint and stops, to be restarted."""
    mark = os.environ.get(PREEMPTED_MARK)
    if mark:
        Path(mark).touch()


def run(args: Sequence[str], env: dict[str, str] | None = None) -> int:
    """torchrun ARGS; its exit status, or PREEMPTED if a worker stopped to be resumed."""
    with tempfile.TemporaryDirectory(prefix="chatflow-torchrun-") as tmp:
        mark = Path(tmp) / "preempted"
        child_env = dict(os.environ if env is None else env) | {PREEMPTED_MARK: str(mark)}
        torchrun = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *args], env=child_env
        )
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, lambda signum, frame: torchrun.send_signal(signum))
        status = torchrun.wait()
        return PREEMPTED if status and mark.exists() else status


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
