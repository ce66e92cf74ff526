"""Progress for the TrainJob's status: Kubeflow Trainer's status server (TrainJobStatus gate).

With the gate on, Trainer injects the server's URL and two file paths, the CA bundle and a
projected service-account token, into the trainer container. Rank 0 POSTs `trainerStatus`
(progress percent, ETA, metrics as strings) there; without the URL nothing happens.

It never slows or breaks training: each POST runs in a daemon thread, at most one in flight,
at most every INTERVAL_SECONDS; a failure is a warning, logged once per kind, never raised.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_CERT_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"  # a file path
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"  # a file path; kubelet rotates its content

# Every POST makes the status server write the TrainJob's status (an API-server write and a
# watch event for every client): a person reading it needs no more than this.
INTERVAL_SECONDS = 15.0
TIMEOUT_SECONDS = 5.0
# At the end: the POST in flight, then the final one, each bounded by the timeout.
FINISH_SECONDS = 2 * TIMEOUT_SECONDS
INT32_MAX = 2**31 - 1  # estimatedRemainingSeconds is an int32

log = logging.getLogger(__name__)


class TrainerStatus:
    """Reports one run's progress to Trainer's status server (rank 0 only)."""

    def __init__(
        self,
        url: str,
        ca_file: str | None,
        token_file: str | None,
        total_steps: int,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.ca_file, self.token_file = url, ca_file, token_file
        self.total_steps = total_steps
        self.interval, self.clock = interval, clock
        self._start = (clock(), 0)  # (time, step) the rate is measured from
        self._last_sent = -float("inf")
        self._metrics: Mapping[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()  # failure kinds logged; only the sending thread adds

    @classmethod
    def from_env(cls, total_steps: int, **kwargs: Any) -> TrainerStatus | None:
        """None outside a TrainJob with the TrainJobStatus gate on."""
        url = os.environ.get(URL_ENV)
        if not url:
            return None
        return cls(
            url, os.environ.get(CA_CERT_ENV), os.environ.get(TOKEN_ENV), total_steps, **kwargs
        )

    def started(self, step: int) -> None:
        """Training (re)starts at `step`: a resumed run's rate counts only the steps done here."""
        self._start = (self.clock(), step)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Step `step` done; sent when the interval has passed and no POST is in flight."""
        self._metrics = metrics
        now = self.clock()
        if now - self._last_sent < self.interval or self._busy():
            return
        self._last_sent = now
        since, first = self._start
        eta = None  # unknown until a step is done here
        if step > first and now > since:
            left = max(self.total_steps - step, 0)
            eta = min(INT32_MAX, round(left * (now - since) / (step - first)))
        self._send(min(100, 100 * step // self.total_steps), eta)

    def finish(self, timeout: float = FINISH_SECONDS) -> None:
        """The run is done: send 100% with the last metrics, waiting at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        if self.wait(timeout):
            self._send(100, 0)
            self.wait(max(deadline - time.monotonic(), 0.0))

    def wait(self, timeout: float) -> bool:
        """Wait for the POST in flight; False if it is still running after `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self._busy()

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _send(self, progress: int, eta: int | None) -> None:
        status: dict[str, Any] = {"progressPercentage": progress}
        if eta is not None:
            status["estimatedRemainingSeconds"] = eta
        status["metrics"] = [{"name": k, "value": _text(v)} for k, v in self._metrics.items()]
        status["lastUpdatedTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = json.dumps({"trainerStatus": status}).encode()
        self._thread = threading.Thread(target=self._post, args=(body,), daemon=True)
        self._thread.start()

    def _post(self, body: bytes) -> None:
        try:
            headers = {"Content-Type": "application/json"}
            if self.token_file:  # read every time: kubelet replaces the token before it expires
                with open(self.token_file) as f:
                    headers["Authorization"] = f"Bearer {f.read().strip()}"
            # Only this CA (Trainer's own, for its server's certificate), read anew like the token.
            context = ssl.create_default_context(cafile=self.ca_file)
            request = urllib.request.Request(self.url, body, headers, method="POST")
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=context):
                pass
        except Exception as e:  # whatever fails, training goes on
            kind = _kind(e)
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning(
                    "trainer status: POST %s failed: %s (this kind of failure is logged once)",
                    self.url,
                    e,
                )


def _text(value: Any) -> str:
    """A metric value as the server wants it: a string (of at most 64 characters)."""
    return format(value, ".6g") if isinstance(value, float) else str(value)[:64]


def _kind(error: Exception) -> str:
    """What failed, for logging each kind once: the HTTP status, or the cause's type."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, Exception):
        return type(error.reason).__name__  # refused, unknown host, certificate not trusted
    return type(error).__name__
