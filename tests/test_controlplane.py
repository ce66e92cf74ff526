"""The integration tests' control plane works: CRDs, the controller manager, RBAC."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi, V1ConfigMap, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from controlplane import ControlPlane

TIMEOUT = 60  # seconds a controller gets to act

PYTORCHJOB = """
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {name: smoke, namespace: default}
spec:
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: OnFailure
      template:
        spec:
          containers: [{name: pytorch, image: busybox, command: ["true"]}]
"""


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path_factory.mktemp("controlplane")) as cp:
        cp.install_pytorchjob_crd()
        yield cp


@pytest.fixture
def core(cp: ControlPlane) -> Iterator[CoreV1Api]:
    with cp.api_client() as client:
        yield CoreV1Api(client)


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {TIMEOUT}s"
        time.sleep(0.2)


def status(call: Callable[..., object], *args: str) -> int:
    """The HTTP status of a client call."""
    try:
        call(*args)
    except ApiException as e:
        return e.status
    return 200


def test_pytorchjob_reads_back(cp: ControlPlane) -> None:
    cp.apply(PYTORCHJOB)

    with cp.api_client() as client:
        job = CustomObjectsApi(client).get_namespaced_custom_object(
            "kubeflow.org", "v1", "default", "pytorchjobs", "smoke"
        )
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    assert master["replicas"] == 1
    assert [c["name"] for c in master["template"]["spec"]["containers"]] == ["pytorch"]


def test_garbage_collector_deletes_dependents(core: CoreV1Api) -> None:
    owner = core.create_namespaced_config_map(
        "default", V1ConfigMap(metadata=V1ObjectMeta(name="owner"))
    )
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
    }
    core.create_namespaced_config_map(
        "default",
        V1ConfigMap(metadata=V1ObjectMeta(name="dependent", owner_references=[reference])),
    )

    core.delete_namespaced_config_map("owner", "default")

    read = (core.read_namespaced_config_map, "dependent", "default")
    eventually(lambda: status(*read) == 404, "the dependent is garbage collected")


def test_service_account_kubeconfig_is_subject_to_rbac(cp: ControlPlane, tmp_path: Path) -> None:
    cp.kubectl("create", "namespace", "rbac")
    cp.kubectl("create", "serviceaccount", "operator", "--namespace=rbac")
    kubeconfig = cp.kubeconfig_for_service_account("rbac", "operator", tmp_path / "kubeconfig")

    with kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) as client:
        list_config_maps = CoreV1Api(client).list_namespaced_config_map
        with pytest.raises(ApiException) as forbidden:
            list_config_maps("rbac")
        assert forbidden.value.status == 403
        # Forbidden, not unauthenticated: the token identifies the ServiceAccount.
        message = json.loads(forbidden.value.body)["message"]
        assert 'User "system:serviceaccount:rbac:operator"' in message

        cp.kubectl(
            "create", "role", "reader", "--verb=list", "--resource=configmaps", "--namespace=rbac"
        )
        cp.kubectl(
            "create", "rolebinding", "reader", "--role=reader",
            "--serviceaccount=rbac:operator", "--namespace=rbac",
        )  # fmt: skip
        # The authorizer reads RBAC objects from a watch cache: a new binding takes a moment.
        eventually(lambda: status(list_config_maps, "rbac") == 200, "the RoleBinding is in force")
