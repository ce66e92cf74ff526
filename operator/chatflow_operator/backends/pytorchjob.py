"""The PyTorchJob backend (kubeflow.org/v1, Kubeflow's training operator v1): a Master (node rank
0) plus nodes-1 Workers, each pod running torchrun with the `PET_*` variables the operator injects.

In place it takes `suspend` and the run's `runPolicy`; every other spec change names a new job.
"""

from __future__ import annotations

from typing import Any

from chatflow.spec import ChatFlowRun, RunPolicy
from chatflow_operator import render
from chatflow_operator.backends import JobState, mirrored
from chatflow_operator.kube import Resource

kind = "PyTorchJob"
resource = Resource("kubeflow.org", "v1", "pytorchjobs")
prepares_data = False  # the reconciler's preparation Job does, before the job is made

CONTAINER = "pytorch"  # the training operator requires this name
MASTER_PORT = 23456  # the training operator's default, named `pytorchjob-port`

# The job's runPolicy fields the run owns: `suspend`, and those of the run's own runPolicy.
_RUN_POLICY_FIELDS = ("suspend", *(field.alias for field in RunPolicy.model_fields.values()))

# The job's condition types as run phases, in the order that breaks ties between conditions set
# in the same second: a finished job stays finished.
PHASES = {
    "Created": "Pending",
    "Running": "Running",
    "Restarting": "Restarting",
    "Suspended": "Suspended",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
}


def _run_policy(spec: dict[str, Any]) -> dict[str, Any]:
    """The job's runPolicy: the in-place fields of the run's spec."""
    return {"suspend": bool(spec.get("suspend", False)), **spec.get("runPolicy", {})}


def render_job(run: dict[str, Any]) -> dict[str, Any]:
    typed = ChatFlowRun.model_validate(run)
    port = {"name": "pytorchjob-port", "containerPort": MASTER_PORT}
    container = render.trainer_container(typed, CONTAINER, render.prepares(run), ports=[port])
    template = render.pod_template(typed, render.job_name(run), container)
    # Exit codes 1-127 fail the job for good (the trainer exits 2 on a bad manifest); 128-255
    # (SIGTERM's 143, SIGKILL's 137: preemption, node loss) restart the pod, which resumes.
    replica = {"restartPolicy": "ExitCode", "template": template}
    replicas = {"Master": {"replicas": 1, **replica}}
    if typed.spec.nodes > 1:
        replicas["Worker"] = {"replicas": typed.spec.nodes - 1, **replica}
    return {
        "apiVersion": f"{resource.group}/{resource.version}",
        "kind": kind,
        "metadata": render.job_metadata(run),
        "spec": {
            "nprocPerNode": str(typed.spec.gpus_per_node or 1),
            "runPolicy": _run_policy(run["spec"]),
            "pytorchReplicaSpecs": replicas,
        },
    }


def in_place_patch(run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
    want = _run_policy(run["spec"])
    have = job["spec"].get("runPolicy", {})
    changed = {key: value for key, value in want.items() if have.get(key) != value}
    # A field removed from the run is removed from the job (null deletes in a merge patch).
    changed |= {key: None for key in have if key not in want and key in _RUN_POLICY_FIELDS}
    return {"spec": {"runPolicy": changed}} if changed else None


def _current_condition(job: dict[str, Any]) -> dict[str, Any] | None:
    """The job's newest True condition: the state the training operator last moved it to."""
    conditions = (job.get("status") or {}).get("conditions") or []
    true = [c for c in conditions if c.get("status") == "True" and c.get("type") in PHASES]
    order = list(PHASES)
    return max(
        true,
        key=lambda c: (c.get("lastTransitionTime") or "", order.index(c["type"])),
        default=None,
    )


def state(job: dict[str, Any] | None, generation: int) -> JobState:
    if job is None:
        return JobState("Pending")
    current = _current_condition(job)
    status = job.get("status") or {}
    return JobState(
        phase=PHASES[current["type"]] if current else "Pending",
        conditions=mirrored(status.get("conditions") or [], generation),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
    )


def rank0_pods(job_name: str) -> str:
    """The Master's pod, by the training operator's labels."""
    return f"training.kubeflow.org/job-name={job_name},training.kubeflow.org/job-role=master"


def preparation_pods(job_name: str) -> str:
    """The pod of the preparation Job made for the job (the Job controller's label)."""
    return f"batch.kubernetes.io/job-name={render.preparation_job_name_of(job_name)}"
