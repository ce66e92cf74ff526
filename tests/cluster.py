"""Helpers for tests against a real control plane: the operator as a process, helm, and waiting."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane import CommandError, ControlPlane

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "chatflow-operator"
# The kustomize base's release name and namespace: the chart then names everything as it does.
RELEASE = "chatflow-operator"
NAMESPACE = "chatflow-system"
OPERATOR_NAMESPACE = NAMESPACE
OPERATOR_ACCOUNT = "chatflow-operator"
TIMEOUT = 60  # seconds a controller gets to act

T = TypeVar("T")
Docs = list[dict[str, Any]]

# kopf pauses every instance while two live ones share a priority, and an instance killed without
# a goodbye looks alive for its peering lifetime (60 s). Each instance a test starts outranks all
# earlier ones, so none waits for a dead predecessor to expire.
_priorities = itertools.count(1)


def wait_for(check: Callable[[], T], what: str, timeout: float = TIMEOUT) -> T:
    """Poll `check` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_output(script: str, *args: str) -> list[Path]:
    """What tests/tools/<script> prints, a path a line: the binary it built (cached), or with
    --crds the CRD files of its module."""
    tool = REPO / "tests" / "tools" / script
    out = subprocess.run([tool, *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    return [Path(line) for line in out.splitlines()]


def install_operator_manifests(cp: ControlPlane) -> None:
    """The kustomize base, as a user installs it. Applied twice: the second pass creates the
    objects of CRDs the first one installed (the ClusterKopfPeering)."""
    base = str(REPO / "manifests" / "base")
    cp.kubectl("apply", "--server-side", "-k", base, check=False)
    for crd in ("chatflowruns.chatflow.io", "clusterkopfpeerings.kopf.dev"):
        wait_for(
            lambda crd=crd: (
                cp.kubectl(
                    "wait", "--for=condition=Established", f"crd/{crd}", check=False
                ).returncode
                == 0
            ),
            f"CRD {crd}",
        )
    cp.kubectl("apply", "--server-side", "-k", base)


def install_namespaced_operator(cp: ControlPlane, namespace: str) -> None:
    """The namespaced overlay, retargeted from its example namespace to `namespace`."""
    overlay = cp.kubectl("kustomize", str(REPO / "manifests" / "overlays" / "namespaced")).stdout
    cp.kubectl("apply", "--server-side", "-f", "-", input=overlay.replace("ml-team", namespace))


class Operator:
    """`chatflow-operator run` as a child process, acting as the ServiceAccount in manifests/."""

    def __init__(self, cp: ControlPlane, workdir: Path, namespace: str | None = None) -> None:
        """Cluster-wide as installed by manifests/base; with `namespace`, watching only that
        namespace as its ServiceAccount there (manifests/overlays/namespaced)."""
        priority = next(_priorities)
        self.kubeconfig = cp.kubeconfig_for_service_account(
            namespace or OPERATOR_NAMESPACE,
            OPERATOR_ACCOUNT,
            workdir / f"operator-{priority}.kubeconfig",
        )
        self.scope = f"--namespace={namespace}" if namespace else "--all-namespaces"
        self.log_path = workdir / f"operator-{priority}.log"
        self.priority = priority
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        command = [
            sys.executable, "-m", "chatflow_operator", "run",
            self.scope,
            "--peering=chatflow-operator",
            f"--priority={self.priority}",
            f"--metrics-port={self.metrics_port}",
            f"--liveness-port={self.liveness_port}",
            "--progress-seconds=1",
        ]  # fmt: skip
        env = os.environ | {"KUBECONFIG": str(self.kubeconfig)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, "the operator's liveness endpoint")
        return self

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz") as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one series of the operator's /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return sample.value
        return 0.0


def get(cp: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    result = cp.kubectl("get", kind, name, f"--namespace={namespace}", "-o", "json", check=False)
    if result.returncode:
        if "NotFound" in result.stderr:
            return None
        raise AssertionError(result.stderr)
    return json.loads(result.stdout)


def items(cp: ControlPlane, kind: str, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", kind, f"--namespace={namespace}", "-o", "json"]
    if selector:
        args.append(f"--selector={selector}")
    return json.loads(cp.kubectl(*args).stdout)["items"]


class Helm:
    """The helm binary of tests/tools/helm.sh, its own state (caches, config) in workdir."""

    def __init__(self, workdir: Path) -> None:
        built = subprocess.run(
            [REPO / "tests" / "tools" / "helm.sh"], check=True, stdout=subprocess.PIPE, text=True
        )
        self.binary = built.stdout.splitlines()[-1]
        self.env = os.environ | {
            f"HELM_{kind}_HOME": str(workdir / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")
        }

    def __call__(
        self, *args: str, cp: ControlPlane | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run helm, against cp's API server as its admin if given; with check, raise on failure."""
        cmd, env = [self.binary, *args], self.env
        if cp is not None:
            cmd.append(f"--kubeconfig={cp.kubeconfig}")
            # Discovery cached per control plane, as ControlPlane.kubectl does.
            env = env | {"KUBECACHEDIR": str(cp.workdir / "helm-kube-cache")}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if check and result.returncode:
            raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def template(self, *args: str, release: str = RELEASE, namespace: str = NAMESPACE) -> Docs:
        """The chart's objects, rendered as a release in a namespace."""
        out = self("template", release, str(CHART), f"--namespace={namespace}", *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]
