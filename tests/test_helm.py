"""The Helm chart (charts/chatflow-operator): lint, rendering, admission by a real API server, and a
release's install, upgrade and uninstall; and that it deploys what the kustomize manifests do.

helm comes from tests/tools/helm.sh (built with Go once, then cached). The values files rendered
here are in tests/helm-values/; those in its invalid/ subdirectory must be rejected.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatflow.observability.queries import OPERATOR_JOB, PREPARATION_JOB, TRAINER_JOB
from chatflow_operator import crd as crd_generator
from chatflow_operator.backends import trainjob
from chatflow_operator.backends.pytorchjob import render_job as pytorch_job
from chatflow_operator.render import preparation_job
from cluster import CHART, NAMESPACE, RELEASE, REPO, Docs, Helm, wait_for
from controlplane import ControlPlane
from factories import run_document

BASE = REPO / "manifests" / "base"
VALUES = REPO / "tests" / "helm-values"
VALUE_FILES = sorted(VALUES.glob("*.yaml"))
CRD = "chatflowruns.chatflow.io"
MONITORING = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tmp_path_factory.mktemp("helm"))


def values(name: str) -> str:
    return f"--values={VALUES / name}"


def of_kind(docs: Docs, kind: str) -> Docs:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(docs, kind) if name in (None, d["metadata"]["name"])]
    return doc


def container(docs: Docs) -> dict[str, Any]:
    (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return operator


def base(file: str) -> Docs:
    return [doc for doc in yaml.safe_load_all((BASE / file).read_text()) if doc]


# Generated and copied files


def test_crd_template_is_the_generated_one() -> None:
    assert (CHART / "templates" / "crd.yaml").read_text() == crd_generator.crd_helm_template(), (
        "the chart's CRD is stale: run "
        "`chatflow-operator crd --helm > charts/chatflow-operator/templates/crd.yaml`"
    )


def test_trainjob_runtime_template_is_the_generated_one() -> None:
    assert (
        CHART / "templates" / "clustertrainingruntime.yaml"
    ).read_text() == trainjob.runtime_helm_template(), (
        "the chart's ClusterTrainingRuntime is stale: run `make generate`"
    )


TRAINER_V2 = "--api-versions=trainer.kubeflow.org/v1alpha1/ClusterTrainingRuntime"


def test_trainjob_runtime_only_where_trainer_v2_is_served(helm: Helm) -> None:
    assert not of_kind(helm.template(), "ClusterTrainingRuntime")
    runtime = one(helm.template(TRAINER_V2), "ClusterTrainingRuntime")
    # The generated manifest's, with the chart's labels.
    expected = trainjob.runtime()
    assert runtime["metadata"]["labels"]["app.kubernetes.io/part-of"] == "chatflow"
    runtime["metadata"]["labels"] = expected["metadata"]["labels"]
    assert runtime == expected
    custom = one(
        helm.template(TRAINER_V2, "--set=trainJob.runtime.image=registry.example/trainer:2",
                      "--set=trainJob.runtime.preparationResources.limits.memory=64Gi"),
        "ClusterTrainingRuntime",
    )  # fmt: skip
    initializer, node = custom["spec"]["template"]["spec"]["replicatedJobs"]
    (prepare,) = initializer["template"]["spec"]["template"]["spec"]["containers"]
    assert prepare["image"] == node["template"]["spec"]["template"]["spec"]["containers"][0][
        "image"
    ] == "registry.example/trainer:2"  # fmt: skip
    assert prepare["resources"]["limits"]["memory"] == "64Gi"
    off = helm.template(TRAINER_V2, "--set=trainJob.runtime.enabled=false")
    assert not of_kind(off, "ClusterTrainingRuntime")


def test_kopf_peering_crds_are_the_kustomize_bases() -> None:
    chart = yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text())
    assert list(chart) == of_kind(base("peering.yaml"), "CustomResourceDefinition")


# Lint and rendering


@pytest.mark.parametrize("file", [None, *VALUE_FILES], ids=lambda f: f.name if f else "default")
def test_lint_strict(helm: Helm, file: Path | None) -> None:
    helm("lint", "--strict", str(CHART), *([f"--values={file}"] if file else []))


def test_chart_agrees_with_the_kustomize_base(helm: Helm) -> None:
    """The same CRD, RBAC rules, and operator container (but for the chart's labels)."""
    docs = helm.template()
    (base_crd,) = base("crd.yaml")
    assert one(docs, "CustomResourceDefinition")["spec"] == base_crd["spec"]
    for role in of_kind(base("rbac.yaml"), "ClusterRole"):
        assert one(docs, "ClusterRole", role["metadata"]["name"])["rules"] == role["rules"]
    chart_pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    base_pod = one(base("deployment.yaml"), "Deployment")["spec"]["template"]["spec"]
    assert chart_pod["securityContext"] == base_pod["securityContext"]
    (base_container,) = base_pod["containers"]
    for key in ("ports", "livenessProbe", "readinessProbe", "resources", "securityContext"):
        assert container(docs)[key] == base_container[key], key
    # Then the chart spells out what the base leaves to the defaults (ports, priority).
    assert container(docs)["args"][:3] == base_container["args"]


def test_default_is_cluster_wide(helm: Helm) -> None:
    docs = helm.template()
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert crd["metadata"]["labels"]["helm.sh/chart"] == "chatflow-operator-0.1.0"

    bindings = of_kind(docs, "ClusterRoleBinding")
    assert {b["roleRef"]["name"] for b in bindings} == {
        RELEASE,
        f"{RELEASE}-kopf",
        f"{RELEASE}-discovery",
    }
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
        ]
    assert not of_kind(docs, "RoleBinding") and not of_kind(docs, "KopfPeering")
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == RELEASE
    assert one(docs, "ServiceAccount")["metadata"]["name"] == RELEASE

    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container(docs)["image"] == "ghcr.io/chatflow/operator:0.1.0"
    assert container(docs)["args"] == [
        "run",
        "--all-namespaces",
        f"--peering={RELEASE}",
        "--priority=0",
        "--metrics-port=8000",
        "--liveness-port=8080",
        "--progress-seconds=15",
    ]
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    assert not MONITORING & {doc["kind"] for doc in docs}
    assert not of_kind(docs, "ConfigMap")


def test_namespaced(helm: Helm) -> None:
    docs = helm.template(values("namespaced.yaml"))
    assert not of_kind(docs, "ClusterKopfPeering")
    # Only kopf's cluster-scoped discovery reads are bound cluster-wide.
    (discovery,) = of_kind(docs, "ClusterRoleBinding")
    assert discovery["roleRef"]["name"] == f"{RELEASE}-discovery"
    # Both other ClusterRoles bound in both namespaces, to the release's ServiceAccount.
    bindings = {
        (b["metadata"]["namespace"], b["roleRef"]["kind"], b["roleRef"]["name"]): b["subjects"]
        for b in of_kind(docs, "RoleBinding")
    }
    subjects = [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    assert bindings == {
        (namespace, "ClusterRole", role): subjects
        for namespace in ("team-a", "team-b")
        for role in (RELEASE, f"{RELEASE}-kopf")
    }
    peerings = of_kind(docs, "KopfPeering")
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("team-a", RELEASE),
        ("team-b", RELEASE),
    }
    args = container(docs)["args"]
    assert args[:3] == ["run", "--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in args


def test_namespaced_defaults_to_the_release_namespace(helm: Helm) -> None:
    docs = helm.template("--set=rbac.scope=namespace")
    assert {b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")} == {NAMESPACE}
    assert one(docs, "KopfPeering")["metadata"]["namespace"] == NAMESPACE
    assert f"--namespace={NAMESPACE}" in container(docs)["args"]


def test_monitoring(helm: Helm) -> None:
    docs = helm.template(values("monitoring.yaml"))
    release_label = {"release": "kube-prometheus-stack"}

    def labelled(doc: dict[str, Any], wanted: dict[str, str]) -> bool:
        return wanted.items() <= doc["metadata"]["labels"].items()

    def job(endpoint: dict[str, Any]) -> str:
        """The job label of the endpoint's series, which the dashboard and the alerts select."""
        (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
        return relabel["replacement"]

    service, monitor = one(docs, "Service"), one(docs, "ServiceMonitor")
    assert labelled(monitor, release_label)
    assert labelled(service, monitor["spec"]["selector"]["matchLabels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert job(endpoint) == OPERATOR_JOB

    pods = one(docs, "PodMonitor", f"{RELEASE}-trainers")
    assert labelled(pods, release_label)
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    # It selects the Master of the PyTorchJob the operator renders, with the label the training
    # operator adds to it, and scrapes the port the operator names.
    run = run_document(storage={"claimName": "data"})
    run["metadata"] |= {"namespace": "default", "uid": "0"}
    master = pytorch_job(run)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    master["metadata"]["labels"]["training.kubeflow.org/job-role"] = "master"
    assert labelled(master, pods["spec"]["selector"]["matchLabels"])
    (endpoint,) = pods["spec"]["podMetricsEndpoints"]
    assert (endpoint["interval"], job(endpoint)) == ("15s", TRAINER_JOB)
    assert endpoint["port"] in [p["name"] for p in master["spec"]["containers"][0]["ports"]]
    # And the other one the pod of the preparation Job the operator renders, and only it.
    preparations = one(docs, "PodMonitor", f"{RELEASE}-preparations")
    assert labelled(preparations, release_label)
    assert preparations["spec"]["namespaceSelector"] == {"any": True}
    preparing = preparation_job(run)["spec"]["template"]
    selector = preparations["spec"]["selector"]["matchLabels"]
    assert labelled(preparing, selector) and not labelled(master, selector)
    (endpoint,) = preparations["spec"]["podMetricsEndpoints"]
    assert (endpoint["interval"], job(endpoint)) == ("15s", PREPARATION_JOB)
    assert endpoint["port"] in [p["name"] for p in preparing["spec"]["containers"][0]["ports"]]

    rule = one(docs, "PrometheusRule")
    assert labelled(rule, release_label)
    rules_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == {"groups": rules_file["groups"]}

    dashboard = one(docs, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert labelled(dashboard, {"grafana_dashboard": "1", **release_label})
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "ChatFlow"}
    (content,) = dashboard["data"].values()
    dashboard_file = CHART / "files" / "grafana-dashboard.json"
    assert json.loads(content) == json.loads(dashboard_file.read_text())


def test_namespaced_pod_monitor_watches_the_watched_namespaces(helm: Helm) -> None:
    docs = helm.template(values("namespaced.yaml"), "--set=metrics.podMonitor.enabled=true")
    monitors = of_kind(docs, "PodMonitor")
    assert len(monitors) == 2  # the trainers' and the preparations'
    for monitor in monitors:
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_custom_image_resources_scheduling_and_peering(helm: Helm) -> None:
    docs = helm.template(values("custom.yaml"))
    custom = yaml.safe_load((VALUES / "custom.yaml").read_text())
    pod = one(docs, "Deployment")["spec"]["template"]
    operator = container(docs)
    assert operator["image"] == "registry.example.com/ml/chatflow-operator:0.1.0-rc1"
    assert operator["imagePullPolicy"] == "Always"
    assert operator["resources"] == custom["resources"]
    for key in ("imagePullSecrets", "nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod["spec"][key] == custom[key], key
    assert pod["metadata"]["annotations"] == custom["podAnnotations"]
    assert custom["podLabels"].items() <= pod["metadata"]["labels"].items()
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "chatflow"
    args = operator["args"]
    assert {"--peering=chatflow", "--priority=10", "--progress-seconds=5"} <= set(args)


def test_standalone_without_crd_or_service_account(helm: Helm) -> None:
    docs = helm.template(values("standalone.yaml"))
    kinds = {doc["kind"] for doc in docs}
    assert not kinds & {"CustomResourceDefinition", "ClusterKopfPeering", "ServiceAccount"}
    assert "--standalone" in container(docs)["args"]
    assert not [arg for arg in container(docs)["args"] if arg.startswith("--peering")]
    for binding in of_kind(docs, "ClusterRoleBinding"):
        assert binding["subjects"][0]["name"] == "chatflow"
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "chatflow"


@pytest.mark.parametrize(("file", "key"), [("typo.yaml", "scop"), ("unknown.yaml", "replicaCount")])
def test_schema_rejects_unknown_keys(helm: Helm, file: str, key: str) -> None:
    args = ("template", RELEASE, str(CHART), f"--values={VALUES / 'invalid' / file}")
    result = helm(*args, check=False)
    assert result.returncode != 0
    assert f"additional properties '{key}' not allowed" in result.stderr, result.stderr


def test_watch_namespaces_need_namespace_scope(helm: Helm) -> None:
    result = helm("template", RELEASE, str(CHART), "--set=watchNamespaces={team-a}", check=False)
    assert "watchNamespaces needs rbac.scope=namespace" in result.stderr, result.stderr


def test_notes_tell_what_to_do_next(helm: Helm) -> None:
    args = ("install", RELEASE, str(CHART), "--dry-run=client", f"--namespace={NAMESPACE}")
    notes = helm(*args, values("namespaced.yaml")).stdout.split("NOTES:", 1)[1]
    assert "kubectl --namespace team-a apply -f manifests/examples/" in notes
    assert "kubectl --namespace team-a get cfr -w" in notes
    assert f"service/{RELEASE}-metrics" in notes and "grafana.dashboard.enabled=true" in notes


# Against the real API server


# The Prometheus Operator's CRDs are not on the test cluster: monitoring.yaml is only rendered.
@pytest.mark.cluster
@pytest.mark.parametrize(
    "file",
    [None, *(f for f in VALUE_FILES if f.name != "monitoring.yaml")],
    ids=lambda f: f.name if f else "default",
)
def test_server_side_dry_run(helm: Helm, cluster: ControlPlane, file: Path | None) -> None:
    """As a release of another name than the `cluster` fixture's kustomize base, whose Deployment
    has another (immutable) selector; the CRDs, of fixed names, are dry-run updates."""
    args = ("--include-crds", *([f"--values={file}"] if file else []))
    docs = helm.template(*args, release="dry-run", namespace="helm-dry-run")
    assert not MONITORING & {doc["kind"] for doc in docs}
    for namespace in {doc["metadata"].get("namespace") for doc in docs} - {None}:
        cluster.kubectl("create", "namespace", namespace, check=False)  # exists after the first
    manifest = yaml.safe_dump_all(docs)
    cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=manifest)


@pytest.mark.cluster
def test_install_upgrade_uninstall(
    helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release's life on a control plane of its own: the `cluster` fixture's holds the kustomize
    base's objects of the same names, which Helm refuses to take over."""
    with ControlPlane(tmp_path / "controlplane") as cp:

        def server_crd() -> dict[str, Any]:
            return json.loads(cp.kubectl("get", "crd", CRD, "-o", "json").stdout)

        release = ("--namespace", NAMESPACE)
        installed = helm("install", RELEASE, str(CHART), *release, "--create-namespace", cp=cp)
        assert "get cfr -w" in installed.stdout  # the NOTES
        crd = server_crd()
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["helm.sh/chart"] == "chatflow-operator-0.1.0"
        # crds/ went in before the templates, among them the peering object of their kind.
        cp.kubectl("get", "clusterkopfpeering", RELEASE)
        cp.kubectl("get", "deployment", RELEASE, *release)

        # A user's run, which must outlive the release.
        def established() -> bool:
            wait = cp.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", check=False)
            return wait.returncode == 0

        wait_for(established, "the CRD")
        run = run_document()
        run["metadata"]["namespace"] = "default"
        cp.apply(yaml.safe_dump(run))

        # The next chart version, whose generated CRD has one printer column more.
        chart = tmp_path / "chart"
        shutil.copytree(CHART, chart)
        column = {"name": "Base", "type": "string", "jsonPath": ".spec.model.base"}
        monkeypatch.setattr(
            crd_generator, "PRINTER_COLUMNS", [*crd_generator.PRINTER_COLUMNS, column]
        )
        (chart / "templates" / "crd.yaml").write_text(crd_generator.crd_helm_template())
        chart_yaml = chart / "Chart.yaml"
        bumped = re.sub(r"(?m)^version: .*$", "version: 0.1.1", chart_yaml.read_text())
        chart_yaml.write_text(bumped)
        helm("upgrade", RELEASE, str(chart), *release, cp=cp)
        crd = server_crd()
        assert crd["spec"]["versions"][0]["additionalPrinterColumns"][-1] == column
        assert crd["metadata"]["labels"]["helm.sh/chart"] == "chatflow-operator-0.1.1"

        helm("uninstall", RELEASE, *release, cp=cp)
        assert cp.kubectl("get", "chatflowrun", "test", "--namespace=default").stdout
        assert server_crd()["spec"]["versions"][0]["additionalPrinterColumns"][-1] == column
        for crd_name in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
            cp.kubectl("get", "crd", crd_name)
        for kind, name in [
            ("deployment", RELEASE),
            ("clusterrole", RELEASE),
            ("clusterrolebinding", f"{RELEASE}-kopf"),
            ("clusterkopfpeering", RELEASE),
        ]:
            gone = cp.kubectl("get", kind, name, *release, check=False)
            assert "NotFound" in gone.stderr, f"{kind}/{name} survived helm uninstall"
