"""The TrainJob backend (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2): a TrainJob on the
chart's ClusterTrainingRuntime `chatflow` (`runtime()`), which the Trainer turns into a JobSet of
two replicated jobs: `dataset-initializer`, one pod of `chatflow prepare` that tokenizes and packs
the data onto the run's volume, then `node`, numNodes indexed pods of torchrun (`PET_*` from the
runtime's torch policy) that only open the prepared cache.

The runtime is the same for every run, so what it cannot know (the run's ConfigMap and volume,
scheduling, labels, the preparation's paths) goes in as runtime patches and initializer env: a
TrainJob's own labels reach neither the JobSet nor its pods.

In place it takes `suspend` (the Trainer re-renders a suspended JobSet; Kueue admits by
unsuspending) and `runPolicy.activeDeadlineSeconds`; restarts and clean-up are the runtime's
Jobs' (the spec refuses backoffLimit and ttlSecondsAfterFinished with this backend).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from chatflow.spec import DEFAULT_IMAGE, ChatFlowRun, Preparation, TrainingSpec
from chatflow_operator import render, status
from chatflow_operator.backends import JobState, mirrored
from chatflow_operator.kube import Resource

kind = "TrainJob"
resource = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs")
prepares_data = True  # in the runtime's dataset-initializer, before the nodes start

RUNTIME = "chatflow"  # the chart's ClusterTrainingRuntime
# The runtime's replicated jobs and their containers, by the names the Trainer requires.
NODE = "node"
INITIALIZER = "dataset-initializer"
INITIALIZER_VOLUME = "initializer"  # the initializer's volume, by Trainer's name
PATCH_MANAGER = "chatflow.io/operator"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
# A failed job is retried this many times (pods that exit 143 or are evicted are not counted).
BACKOFF_LIMIT = 3

# The TrainJob's condition types as run phases, the first True one winning: a batch Job's.
PHASES = status.BATCH_PHASES


def _pod_patch(
    run: ChatFlowRun,
    name: str,
    component: str,
    pod: dict[str, Any],
    container: dict[str, Any],
    fields: tuple[str, ...],
) -> dict[str, Any]:
    """The runtime patch of replicated job `name`'s pods: the pod `fields` and container mounts
    that the runtime cannot know, and the run's labels."""
    spec = {key: pod[key] for key in fields if key in pod}
    spec["containers"] = [{"name": name, "volumeMounts": container["volumeMounts"]}]
    labels = render.labels(run.metadata.name, component)
    return {
        "name": name,
        "template": {"spec": {"template": {"metadata": {"labels": labels}, "spec": spec}}},
    }


def _initializer_volume(item: dict[str, Any]) -> dict[str, Any]:
    """A volume or mount of the initializer's pod: the run's data volume under Trainer's name."""
    return item | {"name": INITIALIZER_VOLUME} if item["name"] == render.DATA_VOLUME else item


def _unique(env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One variable of each name, the last one given (a pod takes the last too, but a TrainJob's
    env lists are keyed by name, so the API server refuses a second)."""
    return list({variable["name"]: variable for variable in env}.values())


def _initializer_env(run: ChatFlowRun) -> list[dict[str, Any]]:
    """Where `chatflow prepare` (the runtime's command for every run) finds this run's paths."""
    output, cache = render.paths(run)
    return [
        {"name": "CHATFLOW_OUTPUT", "value": output},
        {"name": "CHATFLOW_CACHE_DIR", "value": cache},
        {"name": "CHATFLOW_METRICS_PORT", "value": str(run.spec.training.metrics_port)},
        *render.env(run),
    ]


def render_job(run: dict[str, Any]) -> dict[str, Any]:
    typed = ChatFlowRun.model_validate(run)
    # Ports are the runtime's (a patch cannot set them); the operator reads metrics by pod IP.
    container = render.trainer_container(typed, NODE, prepared=True, ports=[])
    pod = render.pod_template(typed, render.job_name(run), container)["spec"]
    trainer = {
        "image": container["image"],
        "command": container["command"],
        "args": container["args"],
        "env": _unique(container["env"]),
        "numNodes": typed.spec.nodes,
        "numProcPerNode": typed.spec.gpus_per_node or 1,
    }
    if "resources" in container:
        trainer["resourcesPerNode"] = container["resources"]
    # Like the PyTorchJob's preparation Job: CPU only, so not the GPU nodes' selector/affinity.
    # Trainer's webhook wants the initializer's volume named `initializer`: the run's volume.
    initializer_pod = {
        **pod,
        "volumes": [_initializer_volume(v) for v in render.volumes(typed, render.job_name(run))],
    }
    initializer = {"volumeMounts": [_initializer_volume(m) for m in render.mounts(typed)]}
    node_fields = ("volumes", "securityContext", "nodeSelector", "affinity", "tolerations",
                   "terminationGracePeriodSeconds")  # fmt: skip
    replicated_jobs = [
        _pod_patch(typed, INITIALIZER, "preparation", initializer_pod, initializer,
                   ("volumes", "securityContext", "tolerations")),
        _pod_patch(typed, NODE, "trainer", pod, container, node_fields),
    ]  # fmt: skip
    spec: dict[str, Any] = {
        "runtimeRef": {
            "name": RUNTIME,
            "apiGroup": resource.group,
            "kind": "ClusterTrainingRuntime",
        },
        "suspend": bool(run["spec"].get("suspend", False)),
        "initializer": {"dataset": {"env": _unique(_initializer_env(typed))}},
        "trainer": trainer,
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": replicated_jobs}}},
            }
        ],
    }
    deadline = run["spec"].get("runPolicy", {}).get("activeDeadlineSeconds")
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    return {
        "apiVersion": f"{resource.group}/{resource.version}",
        "kind": kind,
        "metadata": render.job_metadata(run),
        "spec": spec,
    }


def in_place_patch(run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
    suspend = bool(run["spec"].get("suspend", False))
    deadline = run["spec"].get("runPolicy", {}).get("activeDeadlineSeconds")
    have = job["spec"]
    changed: dict[str, Any] = {}
    if bool(have.get("suspend", False)) != suspend:
        changed["suspend"] = suspend
    if have.get("activeDeadlineSeconds") != deadline:
        # The CRD refuses to change a deadline but not to remove or add one: a new value is set
        # by the pass after the one that removed the old (the removal's watch event starts it).
        changed["activeDeadlineSeconds"] = None if have.get("activeDeadlineSeconds") else deadline
    return {"spec": changed} if changed else None


def state(job: dict[str, Any] | None, generation: int) -> JobState:
    if job is None:
        return JobState("Pending")
    observed = job.get("status") or {}
    conditions = observed.get("conditions") or []
    true = {c.get("type"): c for c in conditions if c.get("status") == "True"}
    counts = {j.get("name"): j for j in observed.get("jobsStatus") or []}
    node, initializer = counts.get(NODE, {}), counts.get(INITIALIZER, {})
    # The nodes start once the initializer's job is complete: until then, the data is prepared.
    preparing = not (node.get("active") or node.get("succeeded") or node.get("failed")) and bool(
        initializer.get("active") or initializer.get("failed")
    )
    prepared = bool(initializer.get("succeeded"))
    phase = next((phase for type, phase in PHASES.items() if type in true), None)
    if phase is None:
        # No condition while it runs: the jobs' pod counts say which step is running.
        phase = "Preparing" if preparing else "Running" if node.get("active") else "Pending"
    complete = true.get("Complete")
    return JobState(
        phase=phase,
        conditions=mirrored(conditions, generation),
        completion_time=complete.get("lastTransitionTime") if complete else None,
        preparing=preparing,
        prepared=prepared,
    )


def _selector(job_name: str, replicated_job: str) -> str:
    """The pods of one replicated job of the job's JobSet (JobSet's labels)."""
    return (
        f"jobset.sigs.k8s.io/jobset-name={job_name},"
        f"jobset.sigs.k8s.io/replicatedjob-name={replicated_job}"
    )


def rank0_pods(job_name: str) -> str:
    """Node rank 0: completion index 0 of the `node` job (the Job controller's label)."""
    return f"{_selector(job_name, NODE)},batch.kubernetes.io/job-completion-index=0"


def preparation_pods(job_name: str) -> str:
    return _selector(job_name, INITIALIZER)


def runtime(
    image: str = DEFAULT_IMAGE, preparation_resources: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ClusterTrainingRuntime `chatflow` that every TrainJob of this backend runs on, its
    preparation running `image` (a TrainJob can set the trainer's image, not the initializer's).

    Both steps are batch Jobs with restartPolicy Never and the podFailurePolicy of our programs'
    exit statuses (render.pod_failure_policy): a bad manifest fails the run at once; a trainer
    stopped by SIGTERM, having saved a checkpoint, is replaced by a pod that resumes from it. A
    deleted pod of one node makes every other node stop at the same step, so all restart.
    """
    workers = Preparation().workers
    memory = f"{workers * render.PREPARATION_MEMORY_PER_WORKER}Gi"
    default = {"cpu": workers, "memory": memory}
    # The PodMonitors' port (a run's own metricsPort is not declared, but still read by the
    # operator by pod IP).
    ports = [
        {"name": "metrics", "containerPort": TrainingSpec.model_fields["metrics_port"].default}
    ]
    initializer_container = {
        "name": INITIALIZER,
        "image": image,
        "command": ["chatflow", "prepare"],
        "args": ["-f", f"{render.CONFIG_DIR}/{render.CONFIG_FILE}"],
        "ports": ports,
        "resources": preparation_resources or {"requests": default, "limits": dict(default)},
    }
    node_container = {"name": NODE, "image": image, "ports": ports}

    def replicated_job(name: str, step: str, container: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "template": {
                "metadata": {"labels": {ANCESTOR_LABEL: step}},
                "spec": {
                    "backoffLimit": BACKOFF_LIMIT,
                    "podFailurePolicy": render.pod_failure_policy(name),
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            # Neither program calls the Kubernetes API (a TrainJob cannot patch
                            # this; Trainer's status server has a token of its own).
                            "automountServiceAccountToken": False,
                            "containers": [container],
                        }
                    },
                },
            },
        }

    node = replicated_job(NODE, "trainer", node_container)
    node["dependsOn"] = [{"name": INITIALIZER, "status": "Complete"}]
    return {
        "apiVersion": f"{resource.group}/{resource.version}",
        "kind": "ClusterTrainingRuntime",
        "metadata": {
            "name": RUNTIME,
            "labels": {"trainer.kubeflow.org/framework": "torch"},
            # Deleting it (`helm uninstall`) would break the TrainJobs that run on it.
            "annotations": {"helm.sh/resource-policy": "keep"},
        },
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},  # processes per node: the TrainJob's
            "template": {
                "spec": {
                    "replicatedJobs": [
                        replicated_job(INITIALIZER, INITIALIZER, initializer_container),
                        node,
                    ]
                }
            },
        },
    }


def runtime_yaml(image: str = DEFAULT_IMAGE) -> str:
    header = "# Generated by `chatflow-operator runtime`; do not edit.\n"
    return header + yaml.safe_dump(runtime(image), sort_keys=False, width=100)


# Stand-ins in runtime() for what the chart's values decide, replaced by template actions.
_HELM_IMAGE = "HELM-IMAGE"
_HELM_RESOURCES = {"HELM": "RESOURCES"}

_SERVED = f"{resource.group}/{resource.version}/ClusterTrainingRuntime"
HELM_HEADER = f"""\
{{{{- /* Generated from chatflow_operator/backends/trainjob.py by `chatflow-operator runtime
--helm`; do not edit. Only where the cluster serves Kubeflow Trainer v2's ClusterTrainingRuntimes
(with `helm template`: --api-versions {_SERVED}). */ -}}}}
{{{{- if and .Values.trainJob.runtime.enabled (.Capabilities.APIVersions.Has "{_SERVED}") }}}}
"""


def runtime_helm_template() -> str:
    """The runtime as the chart's template (templates/clustertrainingruntime.yaml): its image
    and the preparation's resources from the chart's values, and the chart's labels."""
    document = runtime(_HELM_IMAGE, _HELM_RESOURCES)
    text = yaml.safe_dump(document, sort_keys=False, width=100)
    repository = DEFAULT_IMAGE.rsplit(":", 1)[0]
    image = f'(printf "{repository}:%s" .Chart.AppVersion)'
    text = text.replace(_HELM_IMAGE, f"{{{{ .Values.trainJob.runtime.image | default {image} }}}}")
    text = re.sub(
        r"^( *)HELM: RESOURCES$",
        lambda m: (
            "{{- toYaml .Values.trainJob.runtime.preparationResources | nindent "
            f"{len(m.group(1))} }}}}"
        ),
        text,
        flags=re.M,
    )
    labels = "  labels:\n"
    text = text.replace(
        labels, labels + '    {{- include "chatflow-operator.labels" . | nindent 4 }}\n', 1
    )
    return HELM_HEADER + text + "{{- end }}\n"
