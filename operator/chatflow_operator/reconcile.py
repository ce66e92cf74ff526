"""Bring one ChatFlowRun's children in line with its spec and write its status.

Level-triggered: every call reads what exists and converges on what `render` and the job backend
(`backends/`) say should, whatever triggered it (a spec change, a job's status change, a deleted
child, the progress timer, an operator restart). Children have deterministic names, so a create
that finds its child already there adopts it instead of making a second one, and a child of the
run under any other name is deleted.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from chatflow.spec import ChatFlowRun, MixtureProgress
from chatflow_operator import render, status
from chatflow_operator.backends import JobBackend
from chatflow_operator.kube import (
    BATCH_JOBS,
    CONFIG_MAPS,
    PODS,
    RUNS,
    ApiError,
    Conflict,
    Kube,
    Resource,
)

log = logging.getLogger(__name__)

# (run, event type, reason, message): how the reconciler reports transitions.
EventSink = Callable[[dict[str, Any], str, str, str], None]

SCRAPE_TIMEOUT_SECONDS = 3


class ChildConflict(Exception):
    """A child of the expected name is controlled by another object."""


class JobRefused(Exception):
    """The API server refuses the run's job: its kind is not served (the controller is not
    installed), an admission webhook or RBAC refuses it, or it is invalid."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _named(children: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in children if c["metadata"]["name"] == name), None)


def _deleting(child: dict[str, Any]) -> bool:
    return bool(child["metadata"].get("deletionTimestamp"))


class Reconciler:
    def __init__(
        self, kube: Kube, post_event: EventSink, backends: Mapping[str, JobBackend]
    ) -> None:
        """`backends`: the kinds of job that train, by their name in `spec.backend`."""
        self.kube = kube
        self._post_event = post_event
        self.backends = backends
        # Job events and the run's own handlers may reconcile one run at once from different
        # threads; one at a time per run keeps each pass's read-then-write consistent.
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept about a deleted run."""
        self._locks.pop((namespace, name), None)

    def post_event(self, run: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """An Event on the run, and the same line in the log."""
        meta = run["metadata"]
        log.info("%s/%s: %s: %s", meta["namespace"], meta["name"], reason, message)
        self._post_event(run, kind, reason, message)

    def reconcile_child(self, child: dict[str, Any]) -> None:
        """Reconcile the run a child belongs to, read afresh: the child's event may have raced
        with another pass that has just written the run's status."""
        meta = child["metadata"]
        run_name = (meta.get("labels") or {}).get(render.RUN_LABEL)
        if not run_name:
            return
        with self._locks[meta["namespace"], run_name]:
            run = self.kube.get(RUNS, meta["namespace"], run_name)
            if run is None or run["metadata"].get("deletionTimestamp"):
                return  # the run is gone or going: garbage collection takes the children
            self._reconcile(run)

    def reconcile(self, run: dict[str, Any], *, scrape: bool = False) -> dict[str, Any]:
        """Converge and write the status; returns it.

        Every pass lists the run's jobs and ConfigMaps; `scrape` reads a running trainer's, or a
        running preparation's, progress.
        """
        if run["metadata"].get("deletionTimestamp"):
            # Going: the garbage collector takes the children, or (--cascade=orphan) frees them,
            # and adopting them back now would make them go with it.
            return run.get("status") or {}
        meta = run["metadata"]
        with self._locks[meta["namespace"], meta["name"]]:
            if scrape:
                # The timer's body is the run as it was when the timer fired; a pass that held
                # the lock meanwhile may have written a newer status (restarts among it).
                run = self.kube.get(RUNS, meta["namespace"], meta["name"])
                if run is None or run["metadata"].get("deletionTimestamp"):
                    return {}
            return self._reconcile(run, scrape=scrape)

    def _reconcile(self, run: dict[str, Any], *, scrape: bool = False) -> dict[str, Any]:
        meta = run["metadata"]
        old = run.get("status") or {}
        try:
            new = self._converge(run, scrape)
        except JobRefused as e:
            # Said on the run, once; the caller retries (a CRD installed, a runtime fixed).
            new = status.job_refused(run, render.job_name(run), e.reason, str(e), now())
            if new != old:
                removed = {key: None for key in old if key not in new}
                self.kube.patch(
                    RUNS, meta["namespace"], meta["name"], {"status": new | removed}, "status"
                )
                self.post_event(run, "Warning", e.reason, str(e))
            raise
        if new != old:
            removed = {key: None for key in old if key not in new}  # merge patch deletes
            self.kube.patch(
                RUNS, meta["namespace"], meta["name"], {"status": new | removed}, "status"
            )
            event = status.transition(old, new)
            if event:
                kind = "Warning" if new["phase"] == "Failed" else "Normal"
                self.post_event(run, kind, *event)
        return new

    def _converge(self, run: dict[str, Any], scrape: bool) -> dict[str, Any]:
        meta = run["metadata"]
        namespace, selector = meta["namespace"], f"{render.RUN_LABEL}={meta['name']}"
        name = run["spec"].get("backend", render.DEFAULT_BACKEND)  # (a CRD of before backends)
        backend, generation = self.backends[name], meta.get("generation", 0)
        want = render.job_name(run)
        old = run.get("status") or {}
        restarts = old.get("restarts", 0)
        # A finished run's job may be deleted by its TTL; that must not start the run again. A
        # spec change (a new generation) after the end does: e.g. more steps resume training.
        finished = (
            old.get("phase") in status.TERMINAL
            and old.get("observedGeneration") == meta["generation"]
        )

        # Every backend's: a run that changed backend has its old job of the other kind.
        jobs = [(b, self._jobs(b, namespace, selector)) for b in self.backends.values()]
        config_maps = self.kube.list(CONFIG_MAPS, namespace, selector)
        preparations = self.kube.list(BATCH_JOBS, namespace, selector)
        # Every pass deletes all that the current spec does not name, not just what the pass that
        # saw a spec change replaced: a pass killed between its writes, or a ConfigMap made for a
        # spec that changed again before its job was created, leaves children no later spec names.
        replacing = None
        for owner, found in jobs:
            for stale in render.stale_children(run, found):
                name = replacing = stale["metadata"]["name"]
                if not _deleting(stale):
                    # Foreground: the job object stays until its pods are gone, so the new job
                    # cannot start writing checkpoints while the old pods still save theirs.
                    self.kube.delete(owner.resource, namespace, name, foreground=True)
                    restarts += 1
                    self.post_event(
                        run, "Normal", "Restarting",
                        f"spec changed: replacing {owner.kind} {name} with {backend.kind} {want}",
                    )  # fmt: skip
        for stale in render.stale_children(run, config_maps):
            if not _deleting(stale):
                self.kube.delete(CONFIG_MAPS, namespace, stale["metadata"]["name"])
        # A stale preparation only writes cache entries, each renamed into place when complete, so
        # the next one need not wait for its pod to go.
        preparing = render.preparation_job_name(run)
        for stale in render.stale_children(run, preparations, preparing):
            if not _deleting(stale):
                self.kube.delete(BATCH_JOBS, namespace, stale["metadata"]["name"])
        if replacing:
            return status.run_status(
                run, want, None, replacing=replacing, restarts=restarts, now=now()
            )

        current = _named(next(found for b, found in jobs if b is backend), want)
        config = _named(config_maps, want)
        if finished and current is None:
            return old
        # The ConfigMap first: the job's pods mount it.
        if config is not None:
            self._adopt(run, config, CONFIG_MAPS)
        elif not finished:
            self._ensure(run, render.config_map(run), CONFIG_MAPS)
            if current is not None:
                self.post_event(run, "Normal", "Created", f"re-created ConfigMap {want}")
        # With storage the data is prepared before the job starts; once the job exists, that is
        # done (a preparation Job deleted after, say by hand, is not run again).
        # A backend whose job prepares the data itself is created at once.
        by_job = render.prepares(run) and not backend.prepares_data
        prepared = None
        if current is None and by_job:
            preparation = self._prepare(run, _named(preparations, preparing))
            if status.preparation_phase(preparation) != "Succeeded":
                return self._preparing_status(run, backend, want, preparation, restarts, scrape)
            prepared = status.prepared(old, now())
        if current is None:
            try:
                current = self._ensure(run, backend.render_job(run), backend.resource)
            except ApiError as e:
                if e.status == 404:
                    raise JobRefused(
                        status.NOT_SERVED,
                        f"this cluster serves no {backend.kind}s ({backend.resource.api}): "
                        "install its controller, or set spec.backend to another backend",
                    ) from None
                if e.status in (400, 403, 422):
                    raise JobRefused(status.REFUSED, f"cannot create {backend.kind}: {e}") from None
                raise
            made = (
                f"{backend.kind} {want} (Job {preparing} prepared the data)"
                if by_job
                else f"ConfigMap and {backend.kind} {want}"
            )
            self.post_event(run, "Normal", "Created", f"created {made}")
        else:
            current = self._adopt(run, current, backend.resource)
            patch = backend.in_place_patch(run, current)
            if patch:
                current = self.kube.patch(backend.resource, namespace, want, patch)

        progress, trainer_error = None, None
        state = backend.state(current, generation)
        phase, rank0 = state.phase, backend.rank0_pods(want)
        if scrape and phase == "Preparing":
            text = self._metrics(run, backend.preparation_pods(want))
            if text is not None:
                prepared = status.preparation_from_metrics(text, now())
        elif state.prepared:
            prepared = status.prepared(old, now())
        if scrape and phase == "Running":
            typed = ChatFlowRun.model_validate(run)
            text = self._metrics(run, rank0)
            if text is not None:
                progress = status.progress_from_metrics(
                    text, typed.spec.training.total_samples, now()
                )
        if phase == "Failed":
            failed = backend.preparation_pods(want) if state.preparing else rank0
            trainer_error = status.trainer_error(self.kube.list(PODS, namespace, failed))
        elif phase == "Succeeded" and old.get("phase") != "Succeeded":
            old_progress = old.get("progress")
            progress = status.final_progress(
                self.kube.list(PODS, namespace, rank0),
                MixtureProgress.model_validate(old_progress) if old_progress else None,
                ChatFlowRun.model_validate(run).spec.training.total_samples,
                now(),
            )
        return status.run_status(
            run, want, state, restarts=restarts, progress=progress, preparation=prepared,
            trainer_error=trainer_error, now=now(),
        )  # fmt: skip

    def _jobs(self, backend: JobBackend, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The run's jobs of `backend`; none where the cluster does not serve its kind."""
        try:
            return self.kube.list(backend.resource, namespace, selector)
        except ApiError as e:
            if e.status == 404:
                return []
            raise

    def _ensure(self, run: dict[str, Any], child: dict[str, Any], kind: Resource) -> dict[str, Any]:
        """Create `child`, or adopt the one of that name that is already there."""
        meta = child["metadata"]
        try:
            created = self.kube.create(kind, child)
        except Conflict:
            existing = self.kube.get(kind, meta["namespace"], meta["name"])
            if existing is None:  # deleted between the two calls; the next pass creates it
                raise
            return self._adopt(run, existing, kind)
        return created

    def _adopt(self, run: dict[str, Any], child: dict[str, Any], kind: Resource) -> dict[str, Any]:
        """Make an existing child of the expected name the run's (e.g. one orphaned earlier)."""
        if render.owned_by(child, run):
            return child
        meta = child["metadata"]
        others = [o for o in meta.get("ownerReferences") or [] if o.get("controller")]
        if others:
            # Typically a run deleted and re-created under the same name before garbage
            # collection took the old run's children: the retry finds the name free.
            owner = others[0]
            raise ChildConflict(
                f"{kind.plural}/{meta['name']} belongs to {owner['kind']} {owner['name']} "
                f"(uid {owner['uid']}); retrying until it is garbage-collected or removed"
            )
        adopted = self.kube.patch(
            kind,
            meta["namespace"],
            meta["name"],
            {
                "metadata": {
                    "ownerReferences": [
                        *(meta.get("ownerReferences") or []),
                        render.owner_reference(run),
                    ],
                    # What every pass lists the run's children by.
                    "labels": {render.RUN_LABEL: run["metadata"]["name"]},
                }
            },
        )
        # The patch's answer names its kind; the items of a list of ConfigMaps or Jobs do not.
        self.post_event(run, "Normal", "Adopted", f"adopted {adopted['kind']} {meta['name']}")
        return adopted

    def _prepare(self, run: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any]:
        """The preparation Job of the current spec, created, or adopted and suspended or resumed
        with the run."""
        name = render.preparation_job_name(run)
        if job is None:
            job = self._ensure(run, render.preparation_job(run), BATCH_JOBS)
            self.post_event(run, "Normal", "Created", f"created ConfigMap and Job {name}")
            return job
        job = self._adopt(run, job, BATCH_JOBS)
        suspend = render.suspend_patch(run, job)
        if suspend:
            job = self.kube.patch(BATCH_JOBS, run["metadata"]["namespace"], name, suspend)
        return job

    def _preparing_status(
        self,
        run: dict[str, Any],
        backend: JobBackend,
        want: str,
        preparation: dict[str, Any],
        restarts: int,
        scrape: bool,
    ) -> dict[str, Any]:
        """The status while the data is prepared: its progress read from the pod's metrics, or
        when it failed, the error the pod ended with."""
        namespace, pods = run["metadata"]["namespace"], backend.preparation_pods(want)
        phase = status.preparation_phase(preparation)
        progress, error = None, None
        if scrape and phase == "Preparing":
            text = self._metrics(run, pods)
            if text is not None:
                progress = status.preparation_from_metrics(text, now())
        if phase == "Failed":
            error = status.trainer_error(self.kube.list(PODS, namespace, pods))
        return status.run_status(
            run, want, None, preparing=preparation, restarts=restarts, preparation=progress,
            trainer_error=error, now=now(),
        )  # fmt: skip

    def _metrics(self, run: dict[str, Any], pods: str) -> str | None:
        """The /metrics page on the run's metricsPort of the first running pod that `pods`
        selects; None if it cannot be had now."""
        port = ChatFlowRun.model_validate(run).spec.training.metrics_port
        found = self.kube.list(PODS, run["metadata"]["namespace"], pods)
        # A replaced pod may linger beside its successor, with the IP it had.
        found.sort(key=lambda p: p.get("status", {}).get("phase") != "Running")
        ip = next(
            (p.get("status", {}).get("podIP") for p in found if p.get("status", {}).get("podIP")),
            None,
        )
        if not port or not ip:
            return None
        try:
            with urllib.request.urlopen(
                f"http://{ip}:{port}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS
            ) as response:
                return response.read().decode()
        except OSError as e:
            log.debug("cannot read the metrics at %s:%s: %s", ip, port, e)
            return None
