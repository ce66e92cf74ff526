"""Bring one ChatFlowRun's children in line with its spec and write its status.

Level-triggered: every call reads what exists and converges on what `render` says should, whatever
triggered it (a spec change, a job's status change, a deleted child, the progress timer, an operator
restart). Children have deterministic names, so a create that finds its child already there adopts
it instead of making a second one, and a child of the run under any other name is deleted.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from chatflow.spec import ChatFlowRun, MixtureProgress
from chatflow_operator import render, status
from chatflow_operator.kube import CONFIG_MAPS, JOBS, PODS, RUNS, Conflict, Kube

log = logging.getLogger(__name__)

# (run, event type, reason, message): how the reconciler reports transitions.
EventSink = Callable[[dict[str, Any], str, str, str], None]

SCRAPE_TIMEOUT_SECONDS = 3


class ChildConflict(Exception):
    """A child of the expected name is controlled by another object."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _named(children: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in children if c["metadata"]["name"] == name), None)


def _deleting(child: dict[str, Any]) -> bool:
    return bool(child["metadata"].get("deletionTimestamp"))


class Reconciler:
    def __init__(self, kube: Kube, post_event: EventSink) -> None:
        self.kube = kube
        self._post_event = post_event
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

        Every pass lists the run's jobs and ConfigMaps; `scrape` reads a running trainer's progress.
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
        new = self._converge(run, scrape)
        old = run.get("status") or {}
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
        want = render.job_name(run)
        old = run.get("status") or {}
        restarts = old.get("restarts", 0)
        # A finished run's job may be deleted by its TTL; that must not start the run again. A
        # spec change (a new generation) after the end does: e.g. more steps resume training.
        finished = (
            old.get("phase") in status.TERMINAL
            and old.get("observedGeneration") == meta["generation"]
        )

        jobs = self.kube.list(JOBS, namespace, selector)
        config_maps = self.kube.list(CONFIG_MAPS, namespace, selector)
        # Every pass deletes all that the current spec does not name, not just what the pass that
        # saw a spec change replaced: a pass killed between its writes, or a ConfigMap made for a
        # spec that changed again before its job was created, leaves children no later spec names.
        replacing = None
        for stale in render.stale_children(run, jobs):
            name = replacing = stale["metadata"]["name"]
            if not _deleting(stale):
                # Foreground: the job object stays until its pods are gone, so the new job cannot
                # start writing checkpoints while the old pods still save theirs.
                self.kube.delete(JOBS, namespace, name, foreground=True)
                restarts += 1
                self.post_event(
                    run, "Normal", "Restarting", f"spec changed: replacing job {name} with {want}"
                )
        for stale in render.stale_children(run, config_maps):
            if not _deleting(stale):
                self.kube.delete(CONFIG_MAPS, namespace, stale["metadata"]["name"])
        if replacing:
            return status.run_status(
                run, want, None, replacing=replacing, restarts=restarts, now=now()
            )

        current, config = _named(jobs, want), _named(config_maps, want)
        if finished and current is None:
            return old
        # The ConfigMap first: the job's pods mount it.
        if config is not None:
            self._adopt(run, config, CONFIG_MAPS)
        elif not finished:
            self._ensure(run, render.config_map(run), CONFIG_MAPS)
            if current is not None:
                self.post_event(run, "Normal", "Created", f"re-created ConfigMap {want}")
        if current is None:
            current = self._ensure(run, render.pytorch_job(run), JOBS)
            self.post_event(run, "Normal", "Created", f"created ConfigMap and PyTorchJob {want}")
        else:
            current = self._adopt(run, current, JOBS)
            policy = render.run_policy_patch(run, current)
            if policy:
                current = self.kube.patch(JOBS, namespace, want, policy)

        progress, trainer_error = None, None
        phase = status.job_phase(current)
        if scrape and phase == "Running":
            progress = self._scrape(run, want)
        if phase == "Failed":
            trainer_error = status.trainer_error(self.kube.list(PODS, namespace, _master(want)))
        elif phase == "Succeeded" and old.get("phase") != "Succeeded":
            old_progress = old.get("progress")
            progress = status.final_progress(
                self.kube.list(PODS, namespace, _master(want)),
                MixtureProgress.model_validate(old_progress) if old_progress else None,
                ChatFlowRun.model_validate(run).spec.training.total_samples,
                now(),
            )
        return status.run_status(
            run, want, current, restarts=restarts, progress=progress,
            trainer_error=trainer_error, now=now(),
        )  # fmt: skip

    def _ensure(self, run: dict[str, Any], child: dict[str, Any], kind: Any) -> dict[str, Any]:
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

    def _adopt(self, run: dict[str, Any], child: dict[str, Any], kind: Any) -> dict[str, Any]:
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
                f"{child['kind']} {meta['name']} belongs to {owner['kind']} {owner['name']} "
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
                    "labels": render.labels(run["metadata"]["name"]),
                }
            },
        )
        self.post_event(run, "Normal", "Adopted", f"adopted {child['kind']} {meta['name']}")
        return adopted

    def _scrape(self, run: dict[str, Any], job: str) -> MixtureProgress | None:
        """Read rank 0's metrics from the job's master pod; None if they cannot be had now."""
        typed = ChatFlowRun.model_validate(run)
        port = typed.spec.training.metrics_port
        pods = self.kube.list(PODS, run["metadata"]["namespace"], _master(job))
        ip = next(
            (p.get("status", {}).get("podIP") for p in pods if p.get("status", {}).get("podIP")),
            None,
        )
        if not port or not ip:
            return None
        try:
            with urllib.request.urlopen(
                f"http://{ip}:{port}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS
            ) as response:
                text = response.read().decode()
        except OSError as e:
            log.debug("cannot read the trainer's metrics at %s:%s: %s", ip, port, e)
            return None
        return status.progress_from_metrics(text, typed.spec.training.total_samples, now())


def _master(job: str) -> str:
    """The label selector of the job's rank-0 pod (the training operator's labels)."""
    return f"training.kubeflow.org/job-name={job},training.kubeflow.org/job-role=master"
