"""The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager).

No training operator runs: tests patch each PyTorchJob's status the way it would, and create the
master pod it would create. The Job controller does run, but no node, so a preparation Job's pod
never runs: its end is tested on a real node (test_node.py). The operator itself runs as a
process under the ServiceAccount and RBAC of manifests/base.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatflow.spec import load_run, parse_run
from chatflow_operator.backends.pytorchjob import PHASES as JOB_PHASES
from cluster import (
    REPO,
    Operator,
    free_port,
    get,
    install_namespaced_operator,
    install_operator_manifests,
    items,
    wait_for,
)
from controlplane import ControlPlane
from factories import tiny_manifest

EXAMPLES = REPO / "manifests" / "examples"
JOBS = "pytorchjobs.kubeflow.org"
TRAINJOBS = "trainjobs.trainer.kubeflow.org"
PREPARATIONS = "jobs.batch"
RUNS = "chatflowruns.chatflow.io"

pytestmark = pytest.mark.cluster


def apply_run(cp: ControlPlane, namespace: str, path: Path, **spec: Any) -> dict[str, Any]:
    """kubectl apply a run manifest, with `spec` fields replaced (None removes one)."""
    document = yaml.safe_load(path.read_text())
    document["spec"] = {k: v for k, v in (document["spec"] | spec).items() if v is not None}
    cp.kubectl("apply", f"--namespace={namespace}", "-f", "-", input=yaml.safe_dump(document))
    return document


def run_status(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return (get(cp, RUNS, name, namespace) or {}).get("status") or {}


def the_job(cp: ControlPlane, namespace: str, run: str) -> dict[str, Any]:
    """The run's one PyTorchJob, once it exists."""
    return wait_for(
        lambda: next(iter(items(cp, JOBS, namespace, f"chatflow.io/run={run}")), None),
        f"the PyTorchJob of {run}",
    )


def the_preparation(cp: ControlPlane, namespace: str, run: str) -> dict[str, Any]:
    """The run's one preparation Job, once it exists."""
    return wait_for(
        lambda: next(iter(items(cp, PREPARATIONS, namespace, f"chatflow.io/run={run}")), None),
        f"the preparation Job of {run}",
    )


def set_job_conditions(cp: ControlPlane, job: dict[str, Any], *types: str, **extra: Any) -> None:
    """Patch the job's status as the training operator would: `types` in order, the last True."""
    conditions = [
        {
            "type": type,
            "status": "True" if i == len(types) - 1 or type == "Created" else "False",
            "reason": f"PyTorchJob{type}",
            "message": f"PyTorchJob {job['metadata']['name']} is {type.lower()}.",
            "lastUpdateTime": f"2026-01-01T00:00:{i:02d}Z",
            "lastTransitionTime": f"2026-01-01T00:00:{i:02d}Z",
        }
        for i, type in enumerate(types)
    ]
    patch = {"status": {"conditions": conditions, **extra}}
    meta = job["metadata"]
    cp.kubectl(
        "patch", JOBS, meta["name"], f"--namespace={meta['namespace']}",
        "--subresource=status", "--type=merge", "-p", json.dumps(patch),
    )  # fmt: skip


def events(cp: ControlPlane, namespace: str, run: str) -> list[tuple[str, str]]:
    found = items(cp, "events", namespace)
    return [
        (e["reason"], e["message"])
        for e in sorted(found, key=lambda e: e["metadata"]["creationTimestamp"])
        if e["involvedObject"]["name"] == run
    ]


def test_examples_become_jobs_and_config_maps(
    cluster: ControlPlane, operator: Operator, namespace: str
) -> None:
    cluster.kubectl("apply", f"--namespace={namespace}", "-f", str(EXAMPLES / "tiny.yaml"))
    # Without its storage, whose runs prepare their data first (see the test after this one).
    apply_run(cluster, namespace, EXAMPLES / "llama2-7b-zh.yaml", storage=None)

    job = the_job(cluster, namespace, "llama2-7b-zh")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert job["spec"]["nprocPerNode"] == "8"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["args"][3] == "/data/runs/llama2-7b-zh"
    assert "--prepared" not in container["args"]  # the trainer prepares in place
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "ChatFlowRun",
        "llama2-7b-zh",
        True,
    )

    config = get(cluster, "configmap", job["metadata"]["name"], namespace)
    assert config is not None and config["immutable"] is True
    stored = yaml.safe_load(config["data"]["run.yaml"])
    assert stored["spec"]["schedule"]["growth"] == 5_000_000
    assert stored["spec"]["training"]["seqLength"] == 2048

    tiny = the_job(cluster, namespace, "tiny")
    assert list(tiny["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    status = wait_for(lambda: run_status(cluster, namespace, "tiny"), "the tiny run's status")
    assert status["phase"] == "Pending" and status["observedGeneration"] == 1
    assert status["jobName"] == tiny["metadata"]["name"]
    printed = cluster.kubectl("get", "cfr", f"--namespace={namespace}").stdout
    assert printed.split("\n")[0].split()[:4] == ["NAME", "PHASE", "PROGRESS", "STEP"]
    assert items(cluster, PREPARATIONS, namespace) == []


def test_with_storage_the_data_is_prepared_before_the_job(
    cluster: ControlPlane, operator: Operator, namespace: str
) -> None:
    cluster.kubectl("apply", f"--namespace={namespace}", "-f", str(EXAMPLES / "llama2-7b-zh.yaml"))
    preparation = the_preparation(cluster, namespace, "llama2-7b-zh")
    name = preparation["metadata"]["name"]
    status = wait_for(
        lambda: (
            (s := run_status(cluster, namespace, "llama2-7b-zh")).get("phase") == "Preparing" and s
        ),
        "phase Preparing",
    )
    assert name == f"{status['jobName']}-prep"
    (condition,) = status["conditions"]
    assert (condition["type"], condition["reason"]) == ("Preparing", "PreparationStarted")

    # As the API server admitted it: one CPU pod on the run's volume and ConfigMap.
    assert preparation["metadata"]["ownerReferences"][0]["name"] == "llama2-7b-zh"
    rules = preparation["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "Ignore", "Ignore"]
    pod = preparation["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["chatflow", "prepare"]
    args = container["args"]
    assert args[args.index("--workers") + 1] == "32"
    assert args[args.index("--output") + 1] == "/data/chatflow/runs/llama2-7b-zh"
    assert container["resources"]["requests"] == {"cpu": "32", "memory": "64Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "chatflow-data"
    assert volumes["config"]["configMap"]["name"] == status["jobName"]
    assert get(cluster, "configmap", status["jobName"], namespace) is not None

    # The Job controller made the pod (no node runs it); the PyTorchJob waits for it, pass after
    # pass of the operator's timer.
    wait_for(
        lambda: items(cluster, "pods", namespace, f"batch.kubernetes.io/job-name={name}"),
        "the preparation's pod",
    )
    passes = operator.metric("chatflow_operator_reconciles_total", trigger="progress")
    wait_for(
        lambda: (
            operator.metric("chatflow_operator_reconciles_total", trigger="progress") >= passes + 3
        ),
        "three more timer passes",
    )
    assert items(cluster, JOBS, namespace) == []
    assert run_status(cluster, namespace, "llama2-7b-zh")["phase"] == "Preparing"
    said = dict(events(cluster, namespace, "llama2-7b-zh"))
    assert said["Created"] == f"created ConfigMap and Job {name}"
    assert said["Preparing"] == f"New -> Preparing: Job {name} prepares the data"

    cluster.kubectl("delete", RUNS, "llama2-7b-zh", f"--namespace={namespace}", "--wait=false")
    wait_for(lambda: not items(cluster, PREPARATIONS, namespace), "garbage collection of the Job")


def test_a_preparation_is_suspended_and_replaced_with_the_run(
    cluster: ControlPlane, operator: Operator, namespace: str
) -> None:
    example = EXAMPLES / "llama2-7b-zh.yaml"
    apply_run(cluster, namespace, example)
    first = the_preparation(cluster, namespace, "llama2-7b-zh")["metadata"]["name"]
    selector = f"batch.kubernetes.io/job-name={first}"
    wait_for(lambda: items(cluster, "pods", namespace, selector), "the preparation's pod")

    # Suspended in place: the Job controller deletes its pod and says so; so does the run.
    apply_run(cluster, namespace, example, suspend=True)
    wait_for(
        lambda: run_status(cluster, namespace, "llama2-7b-zh").get("phase") == "Suspended",
        "phase Suspended",
    )
    assert get(cluster, PREPARATIONS, first, namespace)["spec"]["suspend"] is True
    wait_for(lambda: not items(cluster, "pods", namespace, selector), "the pod to go")
    apply_run(cluster, namespace, example, suspend=False)
    wait_for(
        lambda: run_status(cluster, namespace, "llama2-7b-zh").get("phase") == "Preparing",
        "phase Preparing again",
    )
    assert get(cluster, PREPARATIONS, first, namespace)["spec"]["suspend"] is False

    # A restart-worthy change names a new preparation; the old one is deleted. No job has been
    # replaced: the run has not restarted.
    apply_run(cluster, namespace, example, nodes=5)

    def preparations() -> list[str]:
        return [p["metadata"]["name"] for p in items(cluster, PREPARATIONS, namespace)]

    new = wait_for(lambda: [n for n in preparations() if n != first], "the new preparation Job")
    wait_for(lambda: preparations() == new, "the old one to go")
    status = wait_for(
        lambda: (
            (s := run_status(cluster, namespace, "llama2-7b-zh"))["observedGeneration"] == 4 and s
        ),
        "the new generation's status",
    )
    assert status["phase"] == "Preparing" and status["restarts"] == 0
    assert new == [f"{status['jobName']}-prep"]
    assert items(cluster, JOBS, namespace) == []


def test_tiny_example_for_cpu_clusters_reads_the_images_assets(
    cluster: ControlPlane, operator: Operator, namespace: str, tiny_example: Path
) -> None:
    cluster.kubectl("apply", f"--namespace={namespace}", "-k", str(EXAMPLES))
    # On its volume: its data prepared by a Job first, as small as the node test's node needs.
    preparation = the_preparation(cluster, namespace, "tiny")
    (container,) = preparation["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    config = get(
        cluster, "configmap", preparation["metadata"]["name"].removesuffix("-prep"), namespace
    )
    spec = parse_run(yaml.safe_load(config["data"]["run.yaml"])).spec
    paths = [spec.model.base, spec.model.tokenizer, spec.model.extend_vocab.tokens_file]
    paths += [source.path for source in spec.data.sources]
    image_assets = "/opt/chatflow/examples/tiny-assets/"  # trainer_image/Dockerfile builds them
    local_assets = tiny_example.parent / "tiny-assets"
    for path in paths:
        assert path.startswith(image_assets), path
        assert (local_assets / path.removeprefix(image_assets)).exists(), path


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        (("Created", "Running", "Succeeded"), "Succeeded"),
        (("Created", "Running", "Failed"), "Failed"),
        (("Created", "Running", "Restarting"), "Restarting"),
        (("Created", "Suspended"), "Suspended"),
    ],
)
def test_job_status_drives_the_run(
    cluster: ControlPlane,
    operator: Operator,
    namespace: str,
    conditions: tuple[str, ...],
    phase: str,
) -> None:
    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
    job = the_job(cluster, namespace, "tiny")
    for i in range(1, len(conditions) + 1):
        set_job_conditions(cluster, job, *conditions[:i], startTime="2026-01-01T00:00:01Z")
        want = JOB_PHASES[conditions[i - 1]]
        wait_for(
            lambda want=want: run_status(cluster, namespace, "tiny").get("phase") == want,
            f"phase {want}",
        )
    status = run_status(cluster, namespace, "tiny")
    assert status["phase"] == phase
    current = next(c for c in status["conditions"] if c["type"] == conditions[-1])
    assert (current["status"], current["reason"]) == ("True", f"PyTorchJob{conditions[-1]}")
    assert status["startTime"] == "2026-01-01T00:00:01Z"
    reasons = wait_for(
        lambda: [r for r, _ in events(cluster, namespace, "tiny") if r == phase], f"{phase} event"
    )
    assert reasons == [phase]
    assert operator.metric("chatflow_operator_runs", phase=phase) >= 1


def test_deleted_children_are_recreated_and_collected_with_the_run(
    cluster: ControlPlane, operator: Operator, namespace: str
) -> None:
    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
    job = the_job(cluster, namespace, "tiny")
    name, uid = job["metadata"]["name"], job["metadata"]["uid"]

    cluster.kubectl("delete", JOBS, name, f"--namespace={namespace}")
    wait_for(
        lambda: (
            (get(cluster, JOBS, name, namespace) or {}).get("metadata", {}).get("uid")
            not in (None, uid)
        ),
        "the job to be re-created",
    )
    config_uid = get(cluster, "configmap", name, namespace)["metadata"]["uid"]
    cluster.kubectl("delete", "configmap", name, f"--namespace={namespace}")
    wait_for(
        lambda: (
            (get(cluster, "configmap", name, namespace) or {}).get("metadata", {}).get("uid")
            not in (None, config_uid)
        ),
        "the ConfigMap to be re-created",
    )
    assert len(items(cluster, JOBS, namespace)) == 1

    cluster.kubectl("delete", RUNS, "tiny", f"--namespace={namespace}", "--wait=false")
    wait_for(
        lambda: (
            not items(cluster, JOBS, namespace)
            and not items(cluster, "configmaps", namespace, "chatflow.io/run")
        ),
        "garbage collection of the run's children",
    )


def test_orphaned_children_are_adopted_by_a_new_run_of_the_same_spec(
    cluster: ControlPlane, operator: Operator, namespace: str, tmp_path: Path
) -> None:
    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
    job = the_job(cluster, namespace, "tiny")
    name = job["metadata"]["name"]

    def owners(kind: str) -> list[str]:
        child = get(cluster, kind, name, namespace)
        return [o["uid"] for o in child["metadata"].get("ownerReferences", [])]

    # Orphan the children while no operator watches: strip their ownerReferences, then delete the
    # run. (Not `--cascade=orphan`: a garbage collector that has not yet seen a just-created
    # child deletes it later as the garbage of a vanished owner.)
    operator.stop()
    for kind in (JOBS, "configmap"):
        cluster.kubectl(
            "patch", kind, name, f"--namespace={namespace}", "--type=json",
            "-p", '[{"op": "remove", "path": "/metadata/ownerReferences"}]',
        )  # fmt: skip
    cluster.kubectl("delete", RUNS, "tiny", f"--namespace={namespace}")
    assert owners(JOBS) == owners("configmap") == []
    successor = Operator(cluster, tmp_path).start()
    try:
        apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
        uid = wait_for(lambda: get(cluster, RUNS, "tiny", namespace), "the new run")["metadata"][
            "uid"
        ]
        for kind in (JOBS, "configmap"):
            wait_for(lambda kind=kind: owners(kind) == [uid], f"the {kind} to be adopted")
        wait_for(
            lambda: "Adopted" in [reason for reason, _ in events(cluster, namespace, "tiny")],
            "the Adopted event",
        )
    finally:
        successor.stop()
    assert [j["metadata"]["uid"] for j in items(cluster, JOBS, namespace)] == [
        job["metadata"]["uid"]
    ]


def test_suspend_and_resume_patch_the_job_in_place(
    cluster: ControlPlane, operator: Operator, namespace: str
) -> None:
    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
    job = the_job(cluster, namespace, "tiny")
    name = job["metadata"]["name"]
    for suspend in (True, False):
        apply_run(cluster, namespace, EXAMPLES / "tiny.yaml", suspend=suspend)
        wait_for(
            lambda suspend=suspend: (
                get(cluster, JOBS, name, namespace)["spec"]["runPolicy"]["suspend"] is suspend
            ),
            f"runPolicy.suspend={suspend}",
        )
    assert [j["metadata"]["name"] for j in items(cluster, JOBS, namespace)] == [name]
    assert run_status(cluster, namespace, "tiny")["restarts"] == 0


def test_restart_worthy_change_replaces_the_job(
    cluster: ControlPlane, operator: Operator, namespace: str
) -> None:
    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
    old = the_job(cluster, namespace, "tiny")
    set_job_conditions(cluster, old, "Created", "Running")
    wait_for(lambda: run_status(cluster, namespace, "tiny").get("phase") == "Running", "Running")

    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml", nodes=2)
    new = wait_for(
        lambda: [
            j
            for j in items(cluster, JOBS, namespace)
            if j["metadata"]["name"] != old["metadata"]["name"]
        ],
        "the new job",
    )[0]
    wait_for(lambda: len(items(cluster, JOBS, namespace)) == 1, "the old job to go")
    assert new["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    # Both jobs train into the same directory: the new one resumes from the newest checkpoint.
    args = [j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
            for j in (old, new)]  # fmt: skip
    assert args[0][args[0].index("--output") + 1] == args[1][args[1].index("--output") + 1]
    status = wait_for(
        lambda: (s := run_status(cluster, namespace, "tiny")).get("phase") == "Pending" and s,
        "the new job to be pending",
    )
    assert status["restarts"] == 1 and status["observedGeneration"] == 2
    assert status["jobName"] == new["metadata"]["name"]
    reasons = [r for r, _ in events(cluster, namespace, "tiny")]
    assert "Restarting" in reasons
    leftover = items(cluster, "configmaps", namespace, "chatflow.io/run=tiny")
    assert [c["metadata"]["name"] for c in leftover] == [new["metadata"]["name"]]


def test_without_trainer_v2_pytorchjobs_run_and_trainjob_runs_wait(tmp_path: Path) -> None:
    """Most clusters have only the training operator: the operator runs, watching TrainJobs once
    their CRD appears, and a trainjob run names what is missing in an Event."""
    with ControlPlane(tmp_path / "controlplane") as cp:
        cp.install_pytorchjob_crd()
        install_operator_manifests(cp)
        cp.kubectl("create", "namespace", "team")
        operator = Operator(cp, tmp_path).start()
        try:
            apply_run(cp, "team", EXAMPLES / "tiny.yaml")
            job = the_job(cp, "team", "tiny")
            wait_for(lambda: run_status(cp, "team", "tiny").get("phase") == "Pending", "Pending")
            assert run_status(cp, "team", "tiny")["jobName"] == job["metadata"]["name"]
            apply_run(cp, "team", EXAMPLES / "tiny.yaml", backend="trainjob",
                      storage={"claimName": "tiny-data"})  # fmt: skip
            status = wait_for(
                lambda: (
                    (s := run_status(cp, "team", "tiny")).get("phase") == "Pending"
                    and any(c["type"] == "JobCreated" for c in s.get("conditions", []))
                    and s
                ),
                "the status to say why",
            )
            (condition,) = status["conditions"]
            assert (condition["type"], condition["reason"]) == ("JobCreated", "JobKindNotServed")
            assert condition["message"].startswith(
                "this cluster serves no TrainJobs (/apis/trainer.kubeflow.org/v1alpha1)"
            ), condition
            assert status["phase"] == "Pending"
            said = [e for e in events(cp, "team", "tiny") if e[0] == "JobKindNotServed"]
            assert said == [("JobKindNotServed", condition["message"])]  # once, though retried
            assert operator.healthy()
        finally:
            operator.stop()


def test_switching_backend_replaces_the_trainjob_with_a_pytorchjob(
    cluster: ControlPlane, operator: Operator, namespace: str
) -> None:
    """(Trainer v2's CRDs here, not its controller: tests/test_node.py runs TrainJobs.)"""
    storage = {"claimName": "tiny-data"}
    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml", storage=storage, backend="trainjob")
    old = wait_for(lambda: items(cluster, TRAINJOBS, namespace, "chatflow.io/run=tiny"),
                   "the TrainJob")[0]  # fmt: skip
    # Created at once: its runtime's initializer prepares the data, not a Job of ours.
    assert items(cluster, PREPARATIONS, namespace) == []
    env = {e["name"]: e.get("value") for e in old["spec"]["initializer"]["dataset"]["env"]}
    assert env["CHATFLOW_OUTPUT"] == "/data/runs/tiny"
    wait_for(lambda: run_status(cluster, namespace, "tiny").get("phase") == "Pending", "Pending")

    apply_run(cluster, namespace, EXAMPLES / "tiny.yaml", storage=storage, backend="pytorchjob")
    wait_for(lambda: not items(cluster, TRAINJOBS, namespace), "the TrainJob to go")
    # The PyTorchJob's preparation Job, on the same volume and output: it resumes the run.
    preparation = the_preparation(cluster, namespace, "tiny")
    args = preparation["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--output") + 1] == "/data/runs/tiny"
    status = wait_for(
        lambda: (s := run_status(cluster, namespace, "tiny")).get("phase") == "Preparing" and s,
        "the new job's preparation",
    )
    assert status["restarts"] == 1 and status["jobName"] != old["metadata"]["name"]
    messages = [m for r, m in events(cluster, namespace, "tiny") if r == "Restarting"]
    assert any(f"replacing TrainJob {old['metadata']['name']} with PyTorchJob" in m
               for m in messages), messages  # fmt: skip


def test_killed_between_config_map_and_job_converges_to_one_of_each(
    cluster: ControlPlane, tmp_path: Path, namespace: str
) -> None:
    # A quota of zero PyTorchJobs holds the operator between its two creates, for real: the API
    # server refuses the job while the ConfigMap went through.
    cluster.kubectl(
        "create", "quota", "no-jobs", f"--namespace={namespace}",
        f"--hard=count/{JOBS}=0",
    )  # fmt: skip
    first = Operator(cluster, tmp_path).start()
    try:
        apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
        wait_for(lambda: items(cluster, "configmaps", namespace, "chatflow.io/run"), "ConfigMap")
        wait_for(lambda: "quota" in first.log(), "the refused job create")
        first.kill(signal.SIGKILL)
    finally:
        first.stop()
    cluster.kubectl("delete", "quota", "no-jobs", f"--namespace={namespace}")

    second = Operator(cluster, tmp_path).start()
    try:
        the_job(cluster, namespace, "tiny")
        wait_for(lambda: run_status(cluster, namespace, "tiny").get("phase"), "a status")
        assert len(items(cluster, JOBS, namespace)) == 1
        assert len(items(cluster, "configmaps", namespace, "chatflow.io/run")) == 1
    finally:
        second.stop()


def test_namespaced_operator_watches_only_its_namespace(
    cluster: ControlPlane, tmp_path: Path, namespace: str
) -> None:
    other = f"{namespace}-other"
    cluster.kubectl("create", "namespace", other)
    install_namespaced_operator(cluster, namespace)
    operator = Operator(cluster, tmp_path, namespace=namespace).start()
    try:
        apply_run(cluster, other, EXAMPLES / "tiny.yaml")
        apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
        the_job(cluster, namespace, "tiny")
        wait_for(lambda: run_status(cluster, namespace, "tiny").get("phase"), "a status")
        assert items(cluster, JOBS, other) == []
        assert "Forbidden" not in operator.log() and "403" not in operator.log()
    finally:
        operator.stop()


def test_operator_account_is_least_privilege(cluster: ControlPlane) -> None:
    account = "system:serviceaccount:chatflow-system:chatflow-operator"

    def can(verb: str, resource: str, namespace: str = "default") -> bool:
        result = cluster.kubectl(
            "auth", "can-i", verb, resource, f"--as={account}", f"--namespace={namespace}",
            check=False,
        )  # fmt: skip
        return result.stdout.strip() == "yes"

    allowed = [
        ("watch", RUNS), ("patch", f"{RUNS}/status"), ("create", JOBS), ("delete", JOBS),
        ("create", PREPARATIONS), ("watch", PREPARATIONS), ("delete", PREPARATIONS),
        ("create", "configmaps"), ("list", "pods"), ("create", "events"),
        ("patch", "clusterkopfpeerings.kopf.dev"),
    ]  # fmt: skip
    denied = [
        ("create", RUNS), ("delete", RUNS), ("update", JOBS), ("update", PREPARATIONS),
        ("get", "secrets"),
        ("create", "pods"), ("delete", "pods"), ("get", "pods"), ("create", "deployments"),
        ("create", "serviceaccounts"), ("create", "rolebindings"), ("list", "nodes"),
        ("delete", "customresourcedefinitions"), ("delete", "events"),
    ]  # fmt: skip
    assert [rule for rule in allowed if not can(*rule)] == []
    assert [rule for rule in denied if can(*rule)] == []


def stable(operator: Operator, metric: str) -> tuple[float] | None:
    """(value,) if the metric holds still for half a second, else None."""
    before = operator.metric(metric)
    time.sleep(0.5)
    return (before,) if operator.metric(metric) == before else None


def test_second_instance_with_lower_priority_never_acts(
    cluster: ControlPlane, tmp_path: Path, namespace: str
) -> None:
    standby = Operator(cluster, tmp_path).start()
    active = Operator(cluster, tmp_path).start()  # started later: a higher priority
    try:
        wait_for(lambda: "Pausing operations in favour of" in standby.log(), "the standby to pause")
        # Before it paused, the standby reconciled the runs earlier tests left behind.
        idle = wait_for(lambda: stable(standby, "chatflow_operator_reconciles_total"), "quiet")
        apply_run(cluster, namespace, EXAMPLES / "tiny.yaml")
        set_job_conditions(cluster, the_job(cluster, namespace, "tiny"), "Created", "Running")
        wait_for(
            lambda: run_status(cluster, namespace, "tiny").get("phase") == "Running", "Running"
        )
        assert active.metric("chatflow_operator_reconciles_total") > 0
        assert standby.metric("chatflow_operator_reconciles_total") == idle[0]
        assert namespace not in standby.log()
        # The active one leaves (and withdraws from the peering): the standby takes over.
        active.stop()
        apply_run(cluster, namespace, EXAMPLES / "tiny.yaml", suspend=True)
        wait_for(
            lambda: the_job(cluster, namespace, "tiny")["spec"]["runPolicy"]["suspend"],
            "the standby to act",
        )
    finally:
        active.stop()
        standby.stop()


def local_pod(cluster: ControlPlane, namespace: str, name: str, labels: str) -> None:
    """A pod with `labels` whose IP is this host's: a local process stands in for it."""
    cluster.kubectl(
        "run", name, "--image=trainer", f"--namespace={namespace}", f"--labels={labels}"
    )  # fmt: skip
    cluster.kubectl(
        "patch", "pod", name, f"--namespace={namespace}",
        "--subresource=status", "--type=merge", "-p", '{"status": {"podIP": "127.0.0.1"}}',
    )  # fmt: skip


@pytest.mark.slow
def test_progress_comes_from_a_real_trainer(
    cluster: ControlPlane,
    operator: Operator,
    namespace: str,
    tiny_example: Path,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    """A real `chatflow train` of the tiny example stands in for the job's master pod."""
    port = free_port()
    training = {"metricsPort": port, "maxSteps": 1000, "checkpoint": {"everySteps": 2, "keep": 1}}
    # Long enough to still run when read.
    manifest = tiny_manifest(
        tiny_example, tmp_path / "tiny.yaml", max_epochs=1000, training=training
    )
    apply_run(cluster, namespace, manifest)
    job = the_job(cluster, namespace, "tiny")
    job_name = job["metadata"]["name"]
    local_pod(
        cluster, namespace, f"{job_name}-master-0",
        f"training.kubeflow.org/job-name={job_name},training.kubeflow.org/job-role=master",
    )  # fmt: skip
    set_job_conditions(cluster, job, "Created", "Running")

    trainer = subprocess.Popen(
        [Path(sys.executable).parent / "chatflow", "train", "-f", str(manifest),
         "--output", str(tmp_path / "out"), "--cache-dir", str(cache_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        progress = wait_for(
            lambda: (
                (p := run_status(cluster, namespace, "tiny").get("progress", {})).get(
                    "lastCheckpointStep"
                )
                and p
            ),
            "progress with a checkpoint in the run's status",
            timeout=240,
        )
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=120)
    run = load_run(manifest)
    batch = run.spec.training.global_batch_size
    assert progress["step"] >= progress["lastCheckpointStep"] >= 2
    assert progress["samples"] == progress["step"] * batch
    assert progress["fraction"] == pytest.approx(progress["samples"] / (1000 * batch))
    assert set(progress["targetWeights"]) == set(run.spec.source_names)
    assert sum(progress["targetWeights"].values()) == pytest.approx(1.0, abs=1e-6)
    assert progress["schedulePhase"]
    printed = cluster.kubectl("get", "cfr", "tiny", f"--namespace={namespace}").stdout
    assert "Running" in printed


@pytest.mark.slow
def test_preparation_progress_comes_from_a_real_chatflow_prepare(
    cluster: ControlPlane, operator: Operator, namespace: str, tiny_example: Path, tmp_path: Path
) -> None:
    """A real `chatflow prepare` of the tiny example, into a cache of its own (so it has work to
    do), stands in for the preparation Job's pod."""
    port = free_port()
    manifest = tiny_manifest(tiny_example, tmp_path / "tiny.yaml", training={"metricsPort": port})
    apply_run(cluster, namespace, manifest, storage={"claimName": "data"})
    name = the_preparation(cluster, namespace, "tiny")["metadata"]["name"]
    local_pod(cluster, namespace, f"{name}-local", f"batch.kubernetes.io/job-name={name}")
    preparing = subprocess.Popen(
        [Path(sys.executable).parent / "chatflow", "prepare", "-f", str(manifest),
         "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out"),
         "--workers", "2", "--metrics-port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        preparation = wait_for(
            lambda: run_status(cluster, namespace, "tiny").get("preparation"),
            "the preparation's progress in the run's status",
            timeout=120,
        )
    finally:
        preparing.terminate()
        preparing.wait(timeout=60)
    sources = load_run(manifest).spec.source_names
    assert preparation["shardsTotal"] >= len(sources)
    assert 0 <= preparation["shardsDone"] <= preparation["shardsTotal"]
    assert preparation["tokens"] >= 0 and preparation["documents"] >= 0
    assert run_status(cluster, namespace, "tiny")["phase"] == "Preparing"
