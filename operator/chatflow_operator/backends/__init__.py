"""Job backends: how a run's training job is expressed for one training controller.

The reconciler is the same for every backend. It asks the run's backend for the job object to
create, the patch a running job takes in place, what the job's status means for the run
(`JobState`), and which pod serves rank 0's metrics; everything else (the ConfigMap, the data
preparation, restarts on a spec change, adoption) is the reconciler's. A backend module is pure:
it renders and reads dicts and makes no API calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from chatflow.spec import Condition
from chatflow_operator.kube import Resource


@dataclass(frozen=True)
class JobState:
    """What a job's status says, in the run's terms."""

    phase: str  # a run phase: Pending, Running, Restarting, Suspended, Succeeded, Failed
    conditions: list[Condition] = field(default_factory=list)  # the job's, for the run's status
    start_time: str | None = None
    completion_time: str | None = None
    # The job's own preparation step is current (only backends that `prepares_data`): a Failed
    # phase is then a failed preparation.
    preparing: bool = False
    prepared: bool = False  # and that step has succeeded


def mirrored(conditions: list[dict[str, Any]], generation: int) -> list[Condition]:
    """A job's conditions as the run's, carrying the run's `generation`."""
    return [
        Condition(
            type=c["type"],
            status=c.get("status", "Unknown"),
            reason=c.get("reason"),
            message=c.get("message"),
            last_transition_time=c.get("lastTransitionTime"),
            observed_generation=generation,
        )
        for c in conditions
    ]


class JobBackend(Protocol):
    """One training controller's job kind."""

    kind: str  # the job's kind, for messages: "PyTorchJob"
    resource: Resource
    # Whether the job prepares the data itself, in a step before the trainers; else, with
    # storage, the reconciler's preparation Job does before the job is created.
    prepares_data: bool

    def render_job(self, run: dict[str, Any]) -> dict[str, Any]:
        """The job that runs the run's current spec."""
        ...

    def in_place_patch(self, run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
        """The merge patch that brings a running job's in-place fields (suspend, ...) in line
        with the run, or None if they are."""
        ...

    def state(self, job: dict[str, Any] | None, generation: int) -> JobState:
        """The run's phase and conditions from the job's status (None: not created yet);
        conditions carry the run's `generation`."""
        ...

    def rank0_pods(self, job_name: str) -> str:
        """The label selector of the pod of node rank 0, whose trainer serves the run's metrics
        and writes its final progress."""
        ...

    def preparation_pods(self, job_name: str) -> str:
        """The label selector of the pod that prepares the data (metrics, errors)."""
        ...


def backends() -> dict[str, JobBackend]:
    """Every backend, by its name in `spec.backend`."""
    from chatflow_operator.backends import pytorchjob, trainjob

    return {"pytorchjob": pytorchjob, "trainjob": trainjob}
