"""Monitoring: the dashboard and rules files, promtool, and a real Prometheus scraping a real run.

The live tests start the operator against the test control plane, a real `chatflow train` of the
tiny example and Debian's Prometheus (tests/tools/prometheus.sh) scraping both every second with
the alerting rules loaded. Every dashboard query and every selector of the rules must then return
data through Prometheus' HTTP API, and `chatflow report` must draw the run from it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from chatflow import report
from chatflow.cli import main as chatflow
from chatflow.observability import queries, rules
from chatflow.observability.generate import stale
from chatflow.observability.prometheus import query
from chatflow.spec import load_run
from chatflow_operator.render import labels as trainer_labels
from cluster import REPO, Operator, free_port, items, wait_for
from controlplane import ControlPlane
from factories import tiny_manifest

MONITORING = REPO / "manifests" / "monitoring"
CHART_FILES = REPO / "charts" / "chatflow-operator" / "files"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
RUN = "tiny"  # the tiny example's name
MONITORING_KINDS = ("podmonitors", "servicemonitors", "prometheusrules")
# Small steps (as in test_train.py) with an evaluation and a checkpoint every 3: every series
# exists within seconds of the first step. Many steps: the run is still going when it is queried.
TRAINING = {
    "seqLength": 32,
    "globalBatchSize": 8,
    "microBatchSize": 2,
    "maxSteps": 5000,
    "checkpoint": {"everySteps": 3, "keep": 1},
    "eval": {"everySteps": 3, "samplesPerSource": 2},
}


def dashboard_queries() -> list[str]:
    return [t["expr"] for panel in DASHBOARD["panels"] for t in panel.get("targets", [])]


def named_queries() -> set[str]:
    return {v.expr for v in vars(queries).values() if isinstance(v, queries.Query)}


def alert_rules() -> list[dict]:
    return [rule for group in rules.groups() for rule in group["rules"]]


# --- the files ---------------------------------------------------------------------------------


def test_generated_files_are_up_to_date() -> None:
    assert stale(REPO) == [], "run `python -m chatflow.observability` and commit the result"


def test_every_form_of_the_rules_holds_the_same_groups() -> None:
    rule = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    for plain in (MONITORING / "rules.yaml", CHART_FILES / "prometheus-rules.yaml"):
        assert yaml.safe_load(plain.read_text())["groups"] == rule["spec"]["groups"]
    assert rule["spec"]["groups"] == rules.groups()


def test_every_dashboard_query_comes_from_queries_py() -> None:
    assert set(dashboard_queries()) <= named_queries()


def test_the_dashboard_shows_the_run() -> None:
    titles = {panel["title"] for panel in DASHBOARD["panels"]}
    for wanted in (
        "Planned vs realised mixture per source",
        "Schedule progress",
        "Schedule phase",
        "Samples drawn per source",
        "Tokens drawn per source",
        "Held-out loss per source",
        "Throughput",
        "Model FLOPs utilisation",
        "Training loss",
        "Learning rate",
        "Checkpoints saved",
        "Step and last checkpoint",
        "Checkpoint duration",
        "Trainer up",
        "Samples per second",
        "Operator reconcile errors per second",
        "ChatFlowRuns by phase",
    ):
        assert wanted in titles
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["namespace"]["query"].startswith("label_values(")
    assert variables["run"]["query"].startswith("label_values(")
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(set(ids)) == len(ids)


def kustomize() -> list[dict]:
    built = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)], check=True, capture_output=True, text=True
    )
    return list(yaml.safe_load_all(built.stdout))


def test_monitors_select_the_trainer_and_operator_pods() -> None:
    objects = {d["kind"]: d for d in kustomize()}
    assert set(objects) == {
        "ConfigMap", "Service", "ServiceMonitor", "PodMonitor", "PrometheusRule",
    }  # fmt: skip
    pods = objects["PodMonitor"]["spec"]
    master = trainer_labels(RUN) | {"training.kubeflow.org/job-role": "master"}
    assert pods["selector"]["matchLabels"].items() <= master.items()
    assert pods["namespaceSelector"] == {"any": True}
    (endpoint,) = pods["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert job_of(endpoint) == queries.TRAINER_JOB

    deployment = yaml.safe_load((REPO / "manifests" / "base" / "deployment.yaml").read_text())
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ports
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert job_of(endpoint) == queries.OPERATOR_JOB

    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(next(iter(dashboard["data"].values()))) == DASHBOARD


def job_of(endpoint: dict) -> str:
    """The job label a monitor's endpoint gives its series: the dashboard and alerts select it."""
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    return relabel["replacement"]


@pytest.mark.cluster
def test_the_api_server_admits_the_monitoring_manifests(cluster: ControlPlane) -> None:
    """Validated against the Prometheus Operator's own CRDs (their schemas reject unknown fields),
    taken from its Go module as tests/controlplane/build.sh takes the PyTorchJob CRD."""
    crds = prometheus_operator_crds()
    cluster.kubectl("apply", "--server-side", *(f"--filename={c}" for c in crds))
    for crd in crds:
        cluster.kubectl("wait", "--for=condition=Established", f"--filename={crd}")
    cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                    input=yaml.safe_dump_all(kustomize()))  # fmt: skip


PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"


def prometheus_operator_crds() -> list[Path]:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    # Outside any module, `go mod download` fetches just that module into the module cache.
    with tempfile.TemporaryDirectory() as outside:
        downloaded = subprocess.run(
            [go, "mod", "download", "-json", PROMETHEUS_OPERATOR],
            cwd=outside, check=True, capture_output=True, text=True,
        )  # fmt: skip
    crds = Path(json.loads(downloaded.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return [crds / f"monitoring.coreos.com_{kind}.yaml" for kind in MONITORING_KINDS]


# --- promtool ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prometheus_dir() -> Path:
    """Debian's prometheus and promtool, installed without root into the tool cache."""
    result = subprocess.run(
        ["bash", str(REPO / "tests" / "tools" / "prometheus.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(result.stdout.splitlines()[-1])


def test_promtool_checks_the_rules(prometheus_dir: Path) -> None:
    for path in (MONITORING / "rules.yaml", CHART_FILES / "prometheus-rules.yaml"):
        promtool(prometheus_dir, "check", "rules", str(path))


def test_promtool_unit_tests_pass(prometheus_dir: Path) -> None:
    promtool(prometheus_dir, "test", "rules", str(MONITORING / "rules-test.yaml"))


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = yaml.safe_load((MONITORING / "rules-test.yaml").read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    fires = {c["alertname"] for c in checks if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in checks if not c.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names
    assert quiet == names


def promtool(prometheus_dir: Path, *args: str) -> None:
    result = subprocess.run(
        [str(prometheus_dir / "promtool"), *args], capture_output=True, text=True, cwd=MONITORING
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real run, scraped -----------------------------------------------------------------------


@dataclass
class Live:
    url: str  # Prometheus
    namespace: str
    manifest: Path
    output: Path  # the trainer's
    logs: tuple[Path, ...]  # the trainer's, Prometheus' and the operator's: shown on a failure

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in self.logs
        )


@pytest.fixture(scope="module")
def live(
    cluster: ControlPlane,
    tiny_example: Path,
    cache_dir: Path,
    prometheus_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    """The operator with the run applied, its trainer, and Prometheus scraping both.

    No training operator runs, so the run's trainer is started here as `chatflow train`; its
    scrape target carries the labels the PodMonitor would give the job's master pod.
    """
    workdir = tmp_path_factory.mktemp("monitoring")
    namespace = f"monitoring-{secrets.token_hex(2)}"
    with ExitStack() as cleanup:  # stops what was started, last first, however far it got
        cluster.kubectl("create", "namespace", namespace)
        cleanup.callback(cluster.kubectl, "delete", "namespace", namespace, "--wait=false")
        operator = Operator(cluster, workdir).start()
        cleanup.callback(operator.stop)
        port = free_port()
        manifest = tiny_manifest(
            tiny_example, workdir / "tiny.yaml", training=TRAINING | {"metricsPort": port}
        )
        cluster.kubectl("apply", f"--namespace={namespace}", "-f", str(manifest))
        job = wait_for(
            lambda: items(cluster, "pytorchjobs.kubeflow.org", namespace, f"chatflow.io/run={RUN}"),
            "the run's PyTorchJob",
        )[0]["metadata"]["name"]

        output = workdir / "out"
        with (workdir / "train.log").open("w") as log:
            trainer = subprocess.Popen(
                [Path(sys.executable).parent / "chatflow", "train", "-f", str(manifest),
                 "--output", str(output), "--cache-dir", str(cache_dir)],
                env=os.environ | {"CHATFLOW_PEAK_FLOPS": "1e12"},  # CPU: no known peak for MFU
                stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,  # torchrun and its workers are stopped as one group
            )  # fmt: skip
        cleanup.callback(_stop_group, trainer)

        web = f"127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(MONITORING / "rules.yaml")],
            "scrape_configs": [
                _static(queries.TRAINER_JOB, port, namespace=namespace, pod=f"{job}-master-0"),
                _static(queries.OPERATOR_JOB, operator.metrics_port, namespace="chatflow-system"),
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with (workdir / "prometheus.log").open("w") as log:
            prometheus = subprocess.Popen(
                [prometheus_dir / "prometheus", f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address={web}"],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        cleanup.callback(_stop, prometheus)
        wait_for(lambda: _ready(f"http://{web}"), "Prometheus to be ready")
        logs = (workdir / "train.log", workdir / "prometheus.log", operator.log_path)
        yield Live(f"http://{web}", namespace, manifest, output, logs)


def _static(job: str, port: int, **labels: str) -> dict:
    """A scrape job of one local target, with the labels the Prometheus Operator would add."""
    return {
        "job_name": job,
        "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}],
    }


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


def _stop_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=120)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready") as response:
            return response.status == 200
    except OSError:
        return False


def _missing(live: Live, exprs: list[str]) -> list[str]:
    """The expressions, filled in for the live run, that Prometheus returns nothing for."""
    filled = [queries.fill(e, run=RUN, namespace=live.namespace, window="10s") for e in exprs]
    return [e for e in filled if not query(live.url, e)]


def _wait_for_data(live: Live, exprs: list[str]) -> None:
    """Until every expression has data: the first step, evaluation and checkpoint take a while."""
    try:
        wait_for(lambda: not _missing(live, exprs), "data for every expression", timeout=300)
    except AssertionError:
        raise AssertionError(f"no data for {_missing(live, exprs)}\n{live.log_tails()}") from None


@pytest.mark.slow
@pytest.mark.cluster
def test_every_dashboard_query_returns_data(live: Live) -> None:
    _wait_for_data(live, dashboard_queries())
    # The variables' label_values(): the run is offered in its namespace.
    steps = query(live.url, f'chatflow_step{{namespace="{live.namespace}"}}')
    assert {s["metric"]["run"] for s in steps} == {RUN}


@pytest.mark.slow
@pytest.mark.cluster
def test_every_rule_selector_returns_data(live: Live) -> None:
    selectors = sorted(
        {
            s.group(0)
            for rule in alert_rules()
            for s in re.finditer(r"\b(?:chatflow_\w+|up)\b(?:\{[^}]*\})?", rule["expr"])
        }
    )
    _wait_for_data(live, selectors)
    # Prometheus loaded every rule and evaluates it without error.
    assert {r["name"] for r in _rules(live.url)} == {rule["alert"] for rule in alert_rules()}
    wait_for(lambda: all(r["health"] == "ok" for r in _rules(live.url)), "rules evaluated")


def _rules(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/rules") as response:
        return [r for group in json.load(response)["data"]["groups"] for r in group["rules"]]


@pytest.mark.slow
@pytest.mark.cluster
def test_report_from_prometheus(live: Live, tmp_path: Path) -> None:
    # Scraped for a few seconds, not just once: the report draws points a second or more apart.
    _wait_for_data(
        live,
        [
            f"count_over_time({name}[1m]) >= 5"
            for name in ("chatflow_heldout_loss", "chatflow_samples_total")
        ],
    )
    png = tmp_path / "report.png"
    assert chatflow(
        ["report", "--prometheus", live.url, "--run", RUN, "--namespace", live.namespace,
         "-o", str(png)]
    ) == 0  # fmt: skip
    _assert_report(png, load_run(live.manifest).spec.source_names)


@pytest.mark.slow
@pytest.mark.cluster
def test_report_from_the_runs_history(live: Live, tmp_path: Path) -> None:
    _wait_for_data(live, [queries.HELDOUT_LOSS.expr])
    png = tmp_path / "report.png"
    assert (
        chatflow(["report", "--history", str(live.output / "history.jsonl"), "-o", str(png)]) == 0
    )
    _assert_report(png, load_run(live.manifest).spec.source_names)


def _assert_report(png: Path, sources: tuple[str, ...]) -> None:
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    summary = json.loads(png.with_suffix(".json").read_text())
    mixture, held_out, loss, throughput = summary["panels"]
    assert [p["title"] for p in summary["panels"]] == list(report.PANELS)
    assert set(mixture["planned"]) == set(mixture["realised"]) == set(sources)
    assert set(held_out["sources"]) == set(sources)
    assert loss["points"] > 0 and throughput["points"] > 0
