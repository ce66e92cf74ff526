"""ChatFlowRun -> the objects that run it, whatever the job backend: a ConfigMap (the trainer's
manifest), with storage the batch Job that prepares the data, and the parts of the training job
every backend shares (names, labels, the trainer's container and pod); each backend
(`backends/`) puts the job itself together.

Pure functions of the run; the handlers create, compare and delete what these return.

Children are named `<run>-<digest>`, the digest taken over every spec field a running job cannot
take in place (see `restart_digest`). A change to one of them therefore names a new job: the
operator replaces the old job with it, and the new one resumes from the newest checkpoint on the
run's volume. Fields outside the digest (`suspend`, `runPolicy`) are patched into the job in place.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from chatflow.spec import API_VERSION, GPU_RESOURCE, KIND, ChatFlowRun, ChatFlowRunSpec

PREPARATION_CONTAINER = "prepare"

RUN_LABEL = "chatflow.io/run"
DIGEST_ANNOTATION = "chatflow.io/spec-digest"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

CONFIG_DIR = "/etc/chatflow"
CONFIG_FILE = "run.yaml"
SCRATCH_MOUNT = "/data"  # an emptyDir stands in when the run has no `storage`
DATA_VOLUME = "data"  # the pods' volume of the run's storage

# Fields a running job takes in place; every other spec change restarts the run.
IN_PLACE_FIELDS = ("suspend", "runPolicy")
DEFAULT_BACKEND = ChatFlowRunSpec.model_fields["backend"].default

# The trainer image's user (trainer_image/Dockerfile). fsGroup makes a fresh PVC writable for it.
TRAINER_UID = 65532

# Time the trainer gets between SIGTERM and SIGKILL to write its checkpoint (suspend, restart,
# preemption). A 7B model under ZeRO-3 writes ~100 GB to a shared volume.
TERMINATION_GRACE_SECONDS = 900

# `chatflow prepare` exits 2 on bad input (a missing path, a bad tokenizer): permanent, so it fails
# the Job at once, naming the field in its termination message; and 143 when stopped by SIGTERM
# (preemption, suspend): resumable, a rerun redoes nothing finished, so it is not counted. Other
# failures (out of memory, a lost node) are retried this many times.
PREPARATION_BACKOFF_LIMIT = 3
PREPARATION_MEMORY_PER_WORKER = 2  # GiB, the default when spec.data.preparation sets no resources


def restart_digest(spec: dict[str, Any]) -> str:
    """A short stable hash of the spec fields a running job cannot take in place."""
    fields = {key: value for key, value in spec.items() if key not in IN_PLACE_FIELDS}
    if fields.get("backend") == DEFAULT_BACKEND:
        # Runs stored before `backend` existed read back with it defaulted: their jobs keep the
        # names they had, so an operator upgrade restarts none of them.
        del fields["backend"]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def job_name(run: dict[str, Any]) -> str:
    """The name of the ConfigMap and job that run the run's current spec."""
    return f"{run['metadata']['name']}-{restart_digest(run['spec'])}"


def preparation_job_name(run: dict[str, Any]) -> str:
    """The name of the Job that prepares the data of the job `job_name(run)`.

    One preparation per job, rather than a name of its own digest over the fields that decide the
    data: those are most of the spec (model, data, schedule, training, image), a second list of
    them could drift from what `chatflow prepare` reads, and a preparation that finds the cache
    holding what the run needs ends as soon as it has checked.
    """
    return preparation_job_name_of(job_name(run))


def preparation_job_name_of(job: str) -> str:
    return f"{job}-prep"


def prepares(run: dict[str, Any]) -> bool:
    """Whether the data is prepared by a Job of its own before the training job starts. Only with
    storage: without it each pod's volume is an emptyDir of its own, which a preparation pod could
    not hand over to the trainers, so the trainer prepares in place."""
    return run["spec"].get("storage") is not None


def labels(run_name: str, component: str = "trainer") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "chatflow",
        "app.kubernetes.io/instance": run_name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "chatflow-operator",
        RUN_LABEL: run_name,
    }


def owner_reference(run: dict[str, Any]) -> dict[str, Any]:
    """Makes the child the run's: garbage-collected with it, and found through it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run["metadata"]["name"],
        "uid": run["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(child: dict[str, Any], run: dict[str, Any]) -> bool:
    """Whether the run controls the child (an object that merely carries its label does not)."""
    owners = child["metadata"].get("ownerReferences") or []
    return any(o.get("uid") == run["metadata"]["uid"] and o.get("controller") for o in owners)


def stale_children(
    run: dict[str, Any], children: list[dict[str, Any]], current: str | None = None
) -> list[dict[str, Any]]:
    """The run's children (of one kind) that its current spec no longer names (`current`, by
    default `job_name(run)`): every one to delete, whichever earlier spec or interrupted pass
    left it behind."""
    current = current or job_name(run)
    return [c for c in children if owned_by(c, run) and c["metadata"]["name"] != current]


def _metadata(run: dict[str, Any], component: str = "trainer") -> dict[str, Any]:
    """Of every child: named after the spec's digest, labelled and owned by the run."""
    name = run["metadata"]["name"]
    return {
        "name": job_name(run),
        "namespace": run["metadata"]["namespace"],
        "labels": labels(name, component),
        "annotations": {DIGEST_ANNOTATION: restart_digest(run["spec"])},
        "ownerReferences": [owner_reference(run)],
    }


def config_map(run: dict[str, Any]) -> dict[str, Any]:
    """The trainer's manifest: the run as the API server stored it (defaults filled in).

    Immutable, and one per job: a job's pods read the spec that job was made for, even when they
    restart after the run's spec has moved on.
    """
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": run["metadata"]["name"], "namespace": run["metadata"]["namespace"]},
        "spec": run["spec"],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run),
        "immutable": True,
        "data": {CONFIG_FILE: yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)},
    }


def paths(run: ChatFlowRun) -> tuple[str, str]:
    """(output, cache) directories in the pods.

    The output directory depends only on the run's name, so every job of the run (after a restart,
    or a re-created run of the same name) resumes from the same checkpoints, as `chatflow train`
    does locally. The packed-data cache is shared by all runs on the volume.
    """
    mount = run.spec.storage.mount_path if run.spec.storage else SCRATCH_MOUNT
    return f"{mount}/runs/{run.metadata.name}", f"{mount}/cache"


def _resources(requests: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _trainer_resources(run: ChatFlowRun) -> dict[str, Any]:
    requests = dict(run.spec.resources.requests)
    limits = dict(run.spec.resources.limits)
    if run.spec.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = run.spec.gpus_per_node
    return _resources(requests, limits)


def env(run: ChatFlowRun) -> list[dict[str, Any]]:
    _, cache = paths(run)
    env = [{"name": "HF_HOME", "value": f"{cache}/huggingface"}]
    return env + [e.model_dump(by_alias=True, exclude_none=True) for e in run.spec.env]


def mounts(run: ChatFlowRun) -> list[dict[str, Any]]:
    """The run's manifest and its volume, where every pod of the run finds them."""
    mount = run.spec.storage.mount_path if run.spec.storage else SCRATCH_MOUNT
    return [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": DATA_VOLUME, "mountPath": mount},
    ]


def volumes(run: ChatFlowRun, config_name: str) -> list[dict[str, Any]]:
    storage = run.spec.storage
    data: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": storage.claim_name}}
        if storage
        else {"emptyDir": {}}
    )
    return [
        {"name": "config", "configMap": {"name": config_name}},
        {"name": DATA_VOLUME, **data},
    ]


def pod_spec(containers: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        # Neither the trainer nor the preparation calls the Kubernetes API.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
        },
        "containers": containers,
        "volumes": volumes,
    }


def job_metadata(run: dict[str, Any]) -> dict[str, Any]:
    """The training job's metadata: as every child's, and in the run's Kueue queue."""
    metadata = _metadata(run)
    queue = run["spec"].get("queueName")
    if queue:
        metadata["labels"][QUEUE_LABEL] = queue
    return metadata


def trainer_container(
    run: ChatFlowRun, name: str, prepared: bool, ports: list[dict[str, Any]]
) -> dict[str, Any]:
    """The trainer's container under the name its backend requires, with the backend's `ports`
    and the run's metrics port."""
    output, cache = paths(run)
    spec = run.spec
    ports = list(ports)
    if spec.training.metrics_port:
        ports.append({"name": "metrics", "containerPort": spec.training.metrics_port})
    args = ["--file", f"{CONFIG_DIR}/{CONFIG_FILE}", "--output", output, "--cache-dir", cache]
    if prepared:  # by the preparation Job: the trainer only opens the cache
        args.append("--prepared")
    container = {
        "name": name,
        "image": spec.image,
        # torchrun takes nodes, rank, processes and the rendezvous from the PET_* variables the
        # training controller injects; chatflow.train.torchrun gives its exit status the meaning
        # a restart policy by exit code needs (a preempted trainer restarts).
        "command": ["python", "-m", "chatflow.train.torchrun", "-m", "chatflow.train"],
        "args": args,
        "env": env(run),
        "ports": ports,
        "volumeMounts": [
            *mounts(run),
            # NCCL and DataLoader workers share tensors through /dev/shm; a pod's default is 64 MiB.
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    resources = _trainer_resources(run)
    if resources:
        container["resources"] = resources
    return container


def pod_template(run: ChatFlowRun, config_name: str, container: dict[str, Any]) -> dict[str, Any]:
    """The trainers' pod: `container`, the run's volumes and scheduling."""
    spec = run.spec
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    pod = pod_spec([container], [*volumes(run, config_name), shm])
    pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS
    scheduling = spec.scheduling.model_dump(by_alias=True, exclude_none=True)
    pod |= {key: value for key, value in scheduling.items() if value}
    return {"metadata": {"labels": labels(run.metadata.name)}, "spec": pod}


def _preparation_resources(run: ChatFlowRun) -> dict[str, Any]:
    """As the spec sets them; else a CPU and PREPARATION_MEMORY_PER_WORKER GiB per worker."""
    preparation = run.spec.data.preparation
    resources = _resources(preparation.resources.requests, preparation.resources.limits)
    if resources:
        return resources
    workers = preparation.workers
    default = {"cpu": workers, "memory": f"{workers * PREPARATION_MEMORY_PER_WORKER}Gi"}
    return {"requests": default, "limits": dict(default)}


def pod_failure_policy(container: str) -> dict[str, Any]:
    """A batch Job's podFailurePolicy for our programs in `container`: exit status 2 (bad input,
    named in the termination message) fails the Job at once; 143 (stopped by SIGTERM after saving
    its work: preemption, suspend, a deleted peer) and evictions do not count against its
    backoffLimit. The pods' restartPolicy must be Never."""
    on_exit = {"containerName": container, "operator": "In"}
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": on_exit | {"values": [2]}},
            {"action": "Ignore", "onExitCodes": on_exit | {"values": [143]}},
            # Evicted or preempted pods may be killed past their grace period (137).
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def preparation_job(run: dict[str, Any]) -> dict[str, Any]:
    """The batch/v1 Job that tokenizes and packs the sources into the volume's cache, only as far
    as the rest of the run needs (it reads the newest checkpoint's position in the output
    directory), before the training job starts. Only for runs that `prepares()`.

    One pod, not an Indexed Job: the shards are known only once the sources are read (the plan
    bounds them), so they cannot be split among pods ahead of time; the pod's `workers` processes
    take them as they free up. CPU only, and without the run's nodeSelector and affinity, which
    choose the GPU nodes the trainers need; its tolerations and priority class still apply. Not in
    the Kueue queue (`queueName`) either, which admits the GPU job.
    """
    typed = ChatFlowRun.model_validate(run)
    spec = typed.spec
    output, cache = paths(typed)
    port = spec.training.metrics_port
    args = [
        "-f", f"{CONFIG_DIR}/{CONFIG_FILE}",
        "--cache-dir", cache,
        "--output", output,
        "--workers", str(spec.data.preparation.workers),
        "--metrics-port", str(port),
    ]  # fmt: skip
    container: dict[str, Any] = {
        "name": PREPARATION_CONTAINER,
        "image": spec.image,
        "command": ["chatflow", "prepare"],
        "args": args,
        "env": env(typed),
        "volumeMounts": mounts(typed),
        "resources": _preparation_resources(typed),
    }
    if port:
        container["ports"] = [{"name": "metrics", "containerPort": port}]
    pod = pod_spec([container], volumes(typed, job_name(run)))
    pod["restartPolicy"] = "Never"  # a failed pod is replaced, as podFailurePolicy requires
    scheduling = spec.scheduling.model_dump(by_alias=True, exclude_none=True)
    pod |= {
        key: scheduling[key] for key in ("tolerations", "priorityClassName") if scheduling.get(key)
    }
    metadata = _metadata(run, "preparation")
    metadata["name"] = preparation_job_name(run)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "suspend": bool(run["spec"].get("suspend", False)),
            "backoffLimit": PREPARATION_BACKOFF_LIMIT,
            "podFailurePolicy": pod_failure_policy(PREPARATION_CONTAINER),
            "template": {
                "metadata": {"labels": labels(run["metadata"]["name"], "preparation")},
                "spec": pod,
            },
        },
    }


def suspend_patch(run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that suspends or resumes a preparation Job with the run, or None."""
    suspend = bool(run["spec"].get("suspend", False))
    return None if job["spec"].get("suspend", False) == suspend else {"spec": {"suspend": suspend}}
