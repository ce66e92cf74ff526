"""The operator's own Prometheus metrics (its trainers export theirs; names in metric_names.py).

Reconcile passes, errors and durations by trigger, and the runs it watches by phase. Triggers are
`run` (spec or startup), `child` (a job or ConfigMap changed) and `progress` (the timer that reads a
running trainer's metrics).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from chatflow import metric_names as names
from chatflow.spec import Phase

RECONCILES = Counter(names.OPERATOR_RECONCILES, "reconcile passes, by trigger", ["trigger"])
ERRORS = Counter(names.OPERATOR_RECONCILE_ERRORS, "reconcile passes that failed", ["trigger"])
DURATION = Histogram(names.OPERATOR_RECONCILE_DURATION, "time of one reconcile pass", ["trigger"])
RUNS = Gauge(names.OPERATOR_RUNS, "ChatFlowRuns watched, by phase", ["phase"])
TRIGGERS = ("run", "child", "progress")

# Every series exists from the start, at 0: rate() and alerts need no `or vector(0)`.
for _trigger in TRIGGERS:
    for _family in (RECONCILES, ERRORS, DURATION):
        _family.labels(_trigger)
for _phase in Phase.__args__:
    RUNS.labels(_phase)

_phases: dict[str, str] = {}
_phases_lock = threading.Lock()


@contextmanager
def reconciling(trigger: str) -> Iterator[None]:
    RECONCILES.labels(trigger).inc()
    start = time.perf_counter()
    try:
        yield
    except Exception:
        ERRORS.labels(trigger).inc()
        raise
    finally:
        DURATION.labels(trigger).observe(time.perf_counter() - start)


def run_phase(uid: str, phase: str | None) -> None:
    """Record a run's phase (None: the run is gone) and recount the runs by phase."""
    with _phases_lock:
        if phase is None:
            _phases.pop(uid, None)
        else:
            _phases[uid] = phase
        for name in Phase.__args__:
            RUNS.labels(name).set(sum(1 for p in _phases.values() if p == name))


def serve(port: int) -> None:
    start_http_server(port)
