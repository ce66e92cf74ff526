"""A ChatFlowRun's status, computed from its job's state (which its backend reads from the job) and
its trainer's metrics, or while the data is prepared, from the preparation Job and its metrics.
Pure functions.

Progress comes from rank 0's Prometheus endpoint, which the operator reads while the job runs,
rather than from the trainer writing to the Kubernetes API: the trainer then needs no credentials
or RBAC (its pods mount no ServiceAccount token), the numbers in the status are the numbers on the
dashboards, and `chatflow train` stays the same program on a laptop and in a pod.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from chatflow import metric_names as names
from chatflow.spec import ChatFlowRunStatus, Condition, MixtureProgress, PreparationProgress
from chatflow_operator.backends import JobState

TERMINAL = ("Succeeded", "Failed")
# A batch Job's conditions as the phase of a run preparing its data, the first True one winning.
BATCH_PHASES = {"Failed": "Failed", "Complete": "Succeeded", "Suspended": "Suspended"}
TRAINER_ERROR = "TrainerError"  # the reason of a Failed condition that carries the trainer's error
PREPARATION_FAILED = "PreparationFailed"  # the same, when the data preparation failed
# The reasons of a run whose job cannot be created: the cluster has no CRD for its kind; the API
# server (an admission webhook, RBAC, validation) refuses it.
NOT_SERVED = "JobKindNotServed"
REFUSED = "JobRefused"


def preparation_phase(job: dict[str, Any]) -> str:
    """The run's phase while its preparation Job is the current step: Preparing until the Job is
    Complete (Succeeded) or Failed, Suspended while suspended."""
    conditions = (job.get("status") or {}).get("conditions") or []
    true = {c.get("type") for c in conditions if c.get("status") == "True"}
    return next((phase for type, phase in BATCH_PHASES.items() if type in true), "Preparing")


def _preparation_condition(job: dict[str, Any], error: str | None, generation: int) -> Condition:
    """The one condition of a preparing run: Preparing, Suspended or Failed, dated by the Job."""
    phase = preparation_phase(job)
    name = job["metadata"]["name"]
    conditions = (job.get("status") or {}).get("conditions") or []
    current = next(
        (c for c in conditions if c.get("status") == "True" and c.get("type") == phase), {}
    )
    reason, message = {
        "Preparing": ("PreparationStarted", f"Job {name} prepares the data"),
        "Suspended": ("PreparationSuspended", f"Job {name}, which prepares the data, is suspended"),
        "Failed": (PREPARATION_FAILED, error or f"Job {name} failed: {current.get('message')}"),
    }[phase]
    return Condition(
        type=phase,
        status="True",
        reason=reason,
        message=message,
        last_transition_time=current.get("lastTransitionTime")
        or job["metadata"].get("creationTimestamp"),
        observed_generation=generation,
    )


def run_status(
    run: dict[str, Any],
    job_name: str,
    job: JobState | None,
    *,
    preparing: dict[str, Any] | None = None,
    replacing: str | None = None,
    restarts: int = 0,
    progress: MixtureProgress | None = None,
    preparation: PreparationProgress | None = None,
    trainer_error: str | None = None,
    now: str,
) -> dict[str, Any]:
    """The status to write: `job` is the state of the current spec's job (None until it
    exists); `preparing` the Job that prepares its data, while that is the current step;
    `replacing` names an outdated job still being deleted, during which the run is Restarting;
    `trainer_error` is why a failed job's trainer, or the failed preparation, gave up (see
    trainer_error())."""
    old = ChatFlowRunStatus.model_validate(run.get("status") or {})
    generation = run["metadata"].get("generation", 0)
    job = job or JobState("Pending")
    conditions, phase = job.conditions, job.phase
    if preparing is not None:
        phase = preparation_phase(preparing)
        conditions = [_preparation_condition(preparing, trainer_error, generation)]
    elif phase == "Failed":
        # The job's condition names the replica that failed; the trainer's (or the preparation's)
        # error says why. Once read it is kept: the pods that held it may be deleted.
        reason = PREPARATION_FAILED if job.preparing else TRAINER_ERROR
        kept = next((c.message for c in old.conditions if c.reason == reason), None)
        if trainer_error or kept:
            conditions = [
                c.model_copy(update={"reason": reason, "message": trainer_error or kept})
                if c.type == "Failed" and c.status == "True"
                else c
                for c in conditions
            ]
    elif phase == "Preparing":
        # A job that prepares the data in a step of its own, which it has no condition for.
        kept = next((c for c in old.conditions if c.type == "Preparing"), None)
        conditions = [
            *conditions,
            kept
            or Condition(
                type="Preparing",
                status="True",
                reason="PreparationStarted",
                message=f"job {job_name} prepares the data before its trainers start",
                last_transition_time=now,
                observed_generation=generation,
            ),
        ]
    if replacing:
        phase = "Restarting"
        conditions = [c for c in conditions if c.type != "Restarting"] + [
            Condition(
                type="Restarting",
                status="True",
                reason="SpecChanged",
                message=f"replacing job {replacing}; {job_name} resumes from its newest checkpoint",
                last_transition_time=now,
                observed_generation=generation,
            )
        ]
    status = ChatFlowRunStatus(
        phase=phase,
        observed_generation=generation,
        job_name=job_name,
        restarts=restarts,
        start_time=job.start_time or old.start_time,
        completion_time=job.completion_time,
        conditions=conditions,
        progress=progress or old.progress,
        preparation=preparation or old.preparation,
    )
    return status.model_dump(by_alias=True, exclude_none=True)


def job_refused(
    run: dict[str, Any], job_name: str, reason: str, message: str, now: str
) -> dict[str, Any]:
    """The status of a run whose job cannot be created: Pending, saying why (dated when first
    said, so a retry that fails the same way changes nothing)."""
    old = ChatFlowRunStatus.model_validate(run.get("status") or {})
    said = next((c for c in old.conditions if c.reason == reason and c.message == message), None)
    condition = Condition(
        type="JobCreated",
        status="False",
        reason=reason,
        message=message,
        last_transition_time=said.last_transition_time if said else now,
        observed_generation=run["metadata"].get("generation", 0),
    )
    state = JobState("Pending", [condition])
    return run_status(run, job_name, state, restarts=old.restarts, now=now)


def trainer_error(pods: list[dict[str, Any]]) -> str | None:
    """The termination message of a trainer that exited with an error, if a pod has one: the
    trainer writes its one-line error there (chatflow.train.loop)."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (container.get("state"), container.get("lastState")):
                terminated = (state or {}).get("terminated") or {}
                if terminated.get("exitCode") and terminated.get("message"):
                    return terminated["message"].strip()
    return None


def final_progress(
    pods: list[dict[str, Any]], progress: MixtureProgress | None, total_samples: int, now: str
) -> MixtureProgress | None:
    """`progress` completed by what the trainer wrote on success as its termination message
    (step, samples, tokens): the last scrape of its metrics came before its last steps."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") == 0 and terminated.get("message"):
                try:
                    final = json.loads(terminated["message"])
                    samples = int(final["samples"])
                    update = {"step": int(final["step"]), "samples": samples,
                              "tokens": int(final["tokens"])}  # fmt: skip
                except (ValueError, KeyError, TypeError):
                    continue  # an image of another version
                update["fraction"] = min(1.0, samples / total_samples)
                update["updated_at"] = now
                if progress is None:
                    return MixtureProgress(schedule_fraction=1.0, **update)
                return progress.model_copy(update=update)
    return progress


def transition(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of the Event to post when the phase changed, else None."""
    before = (old or {}).get("phase")
    if before == new["phase"] or (before is None and new["phase"] == "Pending"):
        return None  # a new run is pending: the Created event says so
    current = next(
        (c for c in new.get("conditions", []) if c["status"] == "True" and c["type"] != "Created"),
        None,
    )
    detail = f": {current['message']}" if current and current.get("message") else ""
    return new["phase"], f"{before or 'New'} -> {new['phase']}{detail}"


def preparation_from_metrics(text: str, now: str) -> PreparationProgress | None:
    """Parse the preparation pod's /metrics page, summed over sources; None until it has planned
    its shards."""
    fields = {
        names.PREPARE_SHARDS_DONE: "shards_done",
        names.PREPARE_SHARDS_TOTAL: "shards_total",
        names.PREPARE_TOKENS: "tokens",
        names.PREPARE_DOCUMENTS: "documents",
    }
    sums = dict.fromkeys(fields.values(), 0)
    seen = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in fields:
                sums[fields[sample.name]] += int(sample.value)
                seen.add(sample.name)
    if names.PREPARE_SHARDS_TOTAL not in seen:
        return None
    return PreparationProgress(**sums, updated_at=now)


def prepared(old: dict[str, Any], now: str) -> PreparationProgress | None:
    """The old status' preparation progress, once the preparation has succeeded: it did every
    shard, though its metrics were last read before the last ones (tokens and documents stay as
    last read). None (keep the old) when there is none or it is complete already."""
    progress = ChatFlowRunStatus.model_validate(old).preparation
    if progress is None or progress.shards_done == progress.shards_total:
        return None
    return progress.model_copy(update={"shards_done": progress.shards_total, "updated_at": now})


def progress_from_metrics(text: str, total_samples: int, now: str) -> MixtureProgress | None:
    """Parse rank 0's /metrics page; None while the trainer has not reported a step yet."""
    values: dict[str, float] = {}
    weights: dict[str, float] = {}
    phase = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == names.MIXTURE_TARGET:
                weights[sample.labels["source"]] = sample.value
            elif sample.name == names.SCHEDULE_PHASE_INFO and sample.value == 1:
                phase = sample.labels["phase"]
            else:
                values[sample.name] = sample.value
    if names.STEP not in values:
        return None
    checkpoint = values.get(names.LAST_CHECKPOINT_STEP)
    samples = int(values.get(names.SAMPLES, 0))
    return MixtureProgress(
        fraction=min(1.0, samples / total_samples),
        schedule_fraction=values.get(names.SCHEDULE_PROGRESS, 0.0),
        schedule_phase=phase,
        step=int(values[names.STEP]),
        samples=samples,
        tokens=int(values.get(names.TOKENS, 0)),
        target_weights=weights,
        last_checkpoint_step=None if checkpoint is None else int(checkpoint),
        updated_at=now,
    )
