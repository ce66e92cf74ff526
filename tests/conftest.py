from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatflow.examples import build_tiny_example, save_llama_tokenizer
from cluster import (
    CHART,
    NAMESPACE,
    RELEASE,
    Helm,
    Operator,
    install_operator_manifests,
    tool_output,
)
from controlplane import ControlPlane
from node import Node

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "manifests" / "examples" / "tiny.yaml"


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LLaMA-style SentencePiece tokenizer (32,000 tokens) saved with save_pretrained."""
    return save_llama_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_example() -> Path:
    """The bundled tiny example's manifest, its assets built where `make run` builds them.

    The build is idempotent and atomic, so test sessions and `make run` share it.
    """
    build_tiny_example(TINY.parent / "tiny-assets")
    return TINY


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One packed-data cache for the session: sources are tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real control plane with the PyTorchJob and Trainer v2 CRDs and the operator's manifests
    installed."""
    with ControlPlane(tmp_path_factory.mktemp("controlplane")) as cp:
        cp.install_pytorchjob_crd()
        for crd in tool_output("trainer.sh", "--crds"):
            cp.install_crd(crd)
        install_operator_manifests(cp)
        yield cp


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test, so tests never see each other's runs."""
    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{secrets.token_hex(2)}"
    cluster.kubectl("create", "namespace", name)
    return name


@pytest.fixture
def operator(cluster: ControlPlane, tmp_path: Path) -> Iterator[Operator]:
    """The operator, running as its ServiceAccount under the RBAC of manifests/base."""
    process = Operator(cluster, tmp_path).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A real node with its control plane and the training operator (tests/node), once per
    session: it takes some 20 seconds to start, and minutes to build the first time."""
    with Node(tmp_path_factory.mktemp("node")) as node:
        yield node


@pytest.fixture(scope="session")
def release(node: Node, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The operator, installed as README says: helm install of the chart, the image ours. Once
    per session, as the node: a second install of the release would fail."""
    helm = Helm(tmp_path_factory.mktemp("helm"))
    # As manifests/examples asks of the tiny run's own preparation: a small one beside the
    # node's other pods, for its TrainJobs (the runtime's default asks 2 CPUs and 4Gi).
    small = '{"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}'
    helm("install", RELEASE, str(CHART), f"--namespace={NAMESPACE}", "--create-namespace",
         f"--set-json=trainJob.runtime.preparationResources={small}", cp=node.cp)  # fmt: skip
    node.kubectl(f"--namespace={NAMESPACE}", "rollout", "status", f"deployment/{RELEASE}",
                 "--timeout=180s")  # fmt: skip
    return RELEASE
