"""GPU scheduling, simulated: the paper's run (manifests/examples/llama2-7b-zh.yaml, 4 nodes x 8
GPUs) applied as README's "Run on Kubernetes" says, to the real node's cluster (tests/node) with
fake GPU nodes beside it that kwok plays. The operator (installed with helm) makes its data
preparation Job, whose pod (32 CPUs: too big for the real node; it tolerates the GPU nodes' taint
as the run does) kwok runs to completion, then its PyTorchJob, the training operator its pods, and
the real kube-scheduler places them as on a GPU node pool: one pod per node with all its GPUs,
tolerating the nodes' taint. kwok only marks them Running; nothing trains. Without Kueue, a run
that needs a fifth node leaves one pod Pending.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from cluster import REPO, wait_for
from node import GPU_RESOURCE, NODE_NAME, Node

pytestmark = pytest.mark.node

EXAMPLE = REPO / "manifests" / "examples" / "llama2-7b-zh.yaml"
RUN = "llama2-7b-zh"
NODES, GPUS = 4, 8  # the example's nodes and gpusPerNode
TIMEOUT = 180  # seconds; kwok marks a scheduled pod Running within about a second
# What the example's header says to create before applying it.
CLAIM = "chatflow-data"
PVC = {
    "apiVersion": "v1",
    "kind": "PersistentVolumeClaim",
    "metadata": {"name": CLAIM},
    "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}},
}
TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def gpu_nodes(node: Node) -> Iterator[list[str]]:
    with node.fake_gpu_nodes(NODES, GPUS) as names:
        yield names


@pytest.fixture
def namespace(node: Node, gpu_nodes: list[str], request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace, deleted with its volume; deleted before the fake nodes go, and waited
    for, so that kwok removes its pods as a kubelet would."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{secrets.token_hex(2)}"
    node.kubectl("create", "namespace", name)
    yield name
    node.kubectl("delete", "namespace", name, "--timeout=120s")
    node.kubectl("delete", "pv", f"{name}-data", "--ignore-not-found")


def job_pods(node: Node, namespace: str) -> tuple[str, list[dict[str, Any]]]:
    """The run's current job and its pods (not those of a job being replaced)."""
    ns = f"--namespace={namespace}"
    run = json.loads(node.kubectl(ns, "get", "chatflowrun", RUN, "-o", "json").stdout)
    job = run.get("status", {}).get("jobName", "")
    if not job:
        return "", []
    selector = f"training.kubeflow.org/job-name={job}"
    out = node.kubectl(ns, "get", "pods", "-l", selector, "-o", "json").stdout
    return job, json.loads(out)["items"]


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = pod.get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


def running(pod: dict[str, Any]) -> bool:
    return pod["spec"].get("nodeName") is not None and pod["status"].get("phase") == "Running"


def diagnose(node: Node, namespace: str) -> str:
    return node.kubectl(f"--namespace={namespace}", "get", "cfr,jobs,pytorchjobs,pods", "-o",
                        "wide", check=False).stdout  # fmt: skip


def assert_gpu_pod(pod: dict[str, Any]) -> None:
    """All of a node's GPUs, /dev/shm in memory, the GPU nodes' taint tolerated."""
    (container,) = pod["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"][GPU_RESOURCE] == str(GPUS), resources
    assert resources["limits"][GPU_RESOURCE] == str(GPUS), resources
    shm = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1, container["volumeMounts"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == shm[0])
    assert volume["emptyDir"]["medium"] == "Memory", volume
    assert TOLERATION in pod["spec"]["tolerations"], pod["spec"]["tolerations"]


def test_the_papers_run_takes_one_gpu_node_per_pod(
    node: Node, release: str, gpu_nodes: list[str], namespace: str
) -> None:
    ns = f"--namespace={namespace}"
    node.add_volume(f"{namespace}-data", claim=(namespace, CLAIM))
    node.kubectl(ns, "apply", "-f", "-", input=yaml.safe_dump(PVC))
    node.kubectl(ns, "create", "secret", "generic", "hf-token", "--from-literal=token=hf_fake")
    node.kubectl(ns, "apply", "-f", str(EXAMPLE))

    def placed(count: int) -> tuple[str, list[dict[str, Any]]] | None:
        job, pods = job_pods(node, namespace)
        return (job, pods) if len(pods) == count and all(map(running, pods)) else None

    try:
        first_job, pods = wait_for(lambda: placed(NODES), f"{NODES} pods Running", TIMEOUT)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{diagnose(node, namespace)}") from None
    roles = sorted(p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in pods)
    assert roles == ["master"] + ["worker"] * (NODES - 1)
    # One pod per GPU node, each on a different one; none on the real node, which has no GPU.
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(gpu_nodes)
    for pod in pods:
        assert_gpu_pod(pod)

    # A fifth node's worth: the run's job is replaced by one of 5 pods, and 4 nodes hold 4.
    node.kubectl(ns, "patch", "chatflowrun", RUN, "--type=merge",
                 "-p", json.dumps({"spec": {"nodes": NODES + 1}}))  # fmt: skip

    def one_unschedulable() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        job, pods = job_pods(node, namespace)
        if job == first_job or len(pods) != NODES + 1:
            return None
        bound = [p for p in pods if running(p)]
        pending = [p for p in pods if condition(p, "PodScheduled").get("status") == "False"]
        return (bound, pending) if len(bound) == NODES and len(pending) == 1 else None

    try:
        bound, (pending,) = wait_for(one_unschedulable, "one pod unschedulable", TIMEOUT)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{diagnose(node, namespace)}") from None
    assert sorted(p["spec"]["nodeName"] for p in bound) == sorted(gpu_nodes)
    assert pending["status"]["phase"] == "Pending"
    assert "nodeName" not in pending["spec"]
    scheduled = condition(pending, "PodScheduled")
    assert scheduled["reason"] == "Unschedulable", scheduled
    assert f"Insufficient {GPU_RESOURCE}" in scheduled["message"], scheduled
    for pod in [*bound, pending]:
        assert_gpu_pod(pod)
    # The real node was left alone: no GPU, no label or taint of the fake nodes.
    real = json.loads(node.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    assert GPU_RESOURCE not in real["status"]["allocatable"]
    assert not any(key.startswith(GPU_RESOURCE) for key in real["metadata"]["labels"])
    assert all(t["key"] != GPU_RESOURCE for t in real["spec"].get("taints", []))
