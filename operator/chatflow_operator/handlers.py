"""The kopf handlers: thin triggers, each of which hands the run to the Reconciler.

What triggers a reconcile of a run:
- the run itself: created, changed (spec or labels), or found when the operator starts;
- any event of one of its training jobs, preparation Jobs or ConfigMaps (status changes, deletion);
- a timer while the data is prepared or the job runs, which also reads their progress.

kopf keeps its bookkeeping in memory (see bookkeeping.py), not in annotations or the status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kopf

from chatflow.spec import API_GROUP
from chatflow_operator import metrics, render
from chatflow_operator.backends import backends
from chatflow_operator.bookkeeping import MemoryDiffBase, MemoryProgress
from chatflow_operator.kube import BATCH_JOBS, CONFIG_MAPS, RUNS, ApiError, Kube
from chatflow_operator.reconcile import ChildConflict, JobRefused, Reconciler

BACKENDS = backends()
JOB_KINDS = [backend.resource for backend in BACKENDS.values()]
CHILD = {render.RUN_LABEL: kopf.PRESENT}
# Handlers are synchronous (blocking HTTP) and run in a pool of this many threads.
WORKERS = 32
# A failed reconcile (API server unavailable, a conflict) is retried after this long.
RETRY_SECONDS = 5


def post_event(run: dict[str, Any], type: str, reason: str, message: str) -> None:
    kopf.event(run, type=type, reason=reason, message=message)


@contextmanager
def reconciling(trigger: str) -> Iterator[None]:
    """Count the pass; expected failures are retried with a one-line message, no traceback."""
    with metrics.reconciling(trigger):
        try:
            yield
        except (ApiError, ChildConflict, JobRefused) as e:
            raise kopf.TemporaryError(str(e), delay=RETRY_SECONDS) from None


def registry(progress_seconds: float) -> kopf.OperatorRegistry:
    """All handlers, in a registry of their own so the CLI's options can shape them."""
    registry = kopf.OperatorRegistry()

    # The same credentials as our own client: in-cluster ServiceAccount, else kubeconfig.
    kopf.on.login(registry=registry)(kopf.login_via_client)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        memo.progress = settings.persistence.progress_storage = MemoryProgress()
        memo.diffbase = settings.persistence.diffbase_storage = MemoryDiffBase()
        settings.persistence.finalizer = f"{API_GROUP}/progress-timer"
        # Our own Events describe transitions; kopf's per-handler chatter stays in the log.
        settings.posting.level = logging.WARNING
        # 200 runs created at once should not queue behind a handful of threads.
        settings.execution.max_workers = WORKERS
        # Only our children: the API server filters the watch streams, not this process.
        for resource in (*JOB_KINDS, BATCH_JOBS, CONFIG_MAPS):
            settings.watching.label_selectors[resource.watched] = render.RUN_LABEL
        memo.reconciler = Reconciler(Kube(connections=WORKERS), post_event, BACKENDS)

    # On startup every run: its children may have changed while no operator watched.
    @kopf.on.resume(*RUNS.watched, id="startup", backoff=RETRY_SECONDS, registry=registry)
    @kopf.on.create(*RUNS.watched, id="reconcile", backoff=RETRY_SECONDS, registry=registry)
    @kopf.on.update(*RUNS.watched, id="reconcile", backoff=RETRY_SECONDS, registry=registry)
    def run_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        with reconciling("run"):
            memo.reconciler.reconcile(dict(body))

    def running(status: kopf.Status, **_: Any) -> bool:
        return status.get("phase") in ("Preparing", "Running")

    # A timer holds a finalizer on the run while it matches, so only running runs (or runs
    # preparing their data) carry one.
    @kopf.timer(
        *RUNS.watched,
        id="progress",
        interval=progress_seconds,
        backoff=RETRY_SECONDS,
        when=running,
        registry=registry,
    )
    def progress(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        with reconciling("progress"):
            memo.reconciler.reconcile(dict(body), scrape=True)

    # Our own creations (ADDED) need no second look; status changes and deletions do.
    def job_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if type in ("MODIFIED", "DELETED"):
            with reconciling("child"):
                memo.reconciler.reconcile_child(dict(body))

    # A kind whose CRD the cluster lacks is not watched (kopf warns) until the CRD appears.
    for resource in (*JOB_KINDS, BATCH_JOBS):
        kopf.on.event(*resource.watched, labels=CHILD, registry=registry)(job_changed)

    # ConfigMaps are immutable: only their deletion matters.
    @kopf.on.event(*CONFIG_MAPS.watched, labels=CHILD, registry=registry)
    def config_deleted(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED":
            with reconciling("child"):
                memo.reconciler.reconcile_child(dict(body))

    @kopf.on.event(*RUNS.watched, registry=registry)
    async def run_seen(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        """Every event of every run: count runs by phase; forget deleted ones. async: it runs on
        the event loop, without a trip to the thread pool."""
        uid = body["metadata"]["uid"]
        if type == "DELETED":
            memo.diffbase.forget(uid)
            memo.progress.forget(uid)
            memo.reconciler.forget(body["metadata"]["namespace"], body["metadata"]["name"])
        phase = None if type == "DELETED" else (body.get("status") or {}).get("phase", "Pending")
        metrics.run_phase(uid, phase)

    return registry
