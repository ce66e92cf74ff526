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
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from chatflow import report
from chatflow.cli import main as chatflow
from chatflow.observability import queries, rules
from chatflow.observability.generate import stale
from chatflow.observability.prometheus import query
from chatflow.spec import load_run
from chatflow_operator.render import labels as run_labels
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


def rule_selectors() -> list[str]:
    """Every series selector of the alert rules' expressions."""
    return sorted(
        {
            s.group(0)
            for rule in alert_rules()
            for s in re.finditer(r"\b(?:chatflow_\w+|up)\b(?:\{[^}]*\})?", rule["expr"])
        }
    )


def preparing(expr: str) -> bool:
    """Whether the expression reads the data preparation's metrics, which a preparation Job's
    pod serves before the trainer starts."""
    return "chatflow_prepare_" in expr


def gpu(expr: str) -> bool:
    """Whether the expression reads NVIDIA's DCGM exporter, which a CPU run has none of."""
    return "DCGM_" in expr


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


def test_monitors_select_the_trainer_preparation_and_operator_pods() -> None:
    built = kustomize()
    objects = {d["kind"]: d for d in built if d["kind"] != "PodMonitor"}
    assert set(objects) == {"ConfigMap", "Service", "ServiceMonitor", "PrometheusRule"}
    monitors = {d["metadata"]["name"]: d["spec"] for d in built if d["kind"] == "PodMonitor"}
    master = run_labels(RUN) | {"training.kubeflow.org/job-role": "master"}
    preparation = run_labels(RUN, "preparation")
    # Each selects its own pods and only those: the job's master, the preparation Job's pod.
    for name, pods, others, job in (
        ("chatflow-trainer", master, preparation, queries.TRAINER_JOB),
        ("chatflow-preparation", preparation, master, queries.PREPARATION_JOB),
    ):
        spec = monitors.pop(name)
        selector = spec["selector"]["matchLabels"].items()
        assert selector <= pods.items() and not selector <= others.items()
        assert spec["namespaceSelector"] == {"any": True}
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics"
        assert job_of(endpoint) == job
    assert monitors == {}

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
            tiny_example,
            workdir / "tiny.yaml",
            max_epochs=1000,  # many steps (TRAINING)
            training=TRAINING | {"metricsPort": port},
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

        scrape = [
            _static(queries.TRAINER_JOB, port, namespace=namespace, pod=f"{job}-master-0"),
            _static(queries.OPERATOR_JOB, operator.metrics_port, namespace="chatflow-system"),
        ]
        url = cleanup.enter_context(
            _prometheus(prometheus_dir, workdir, scrape, rules=MONITORING / "rules.yaml")
        )
        logs = (workdir / "train.log", workdir / "prometheus.log", operator.log_path)
        yield Live(url, namespace, manifest, output, logs)


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
    _wait_for_data(live, [e for e in dashboard_queries() if not preparing(e) and not gpu(e)])
    # The variables' label_values(): the run is offered in its namespace.
    steps = query(live.url, f'chatflow_step{{namespace="{live.namespace}"}}')
    assert {s["metric"]["run"] for s in steps} == {RUN}


@pytest.mark.slow
@pytest.mark.cluster
def test_every_rule_selector_returns_data(live: Live) -> None:
    _wait_for_data(live, [e for e in rule_selectors() if not preparing(e)])
    # Prometheus loaded every rule and evaluates it without error.
    assert {r["name"] for r in _rules(live.url)} == {rule["alert"] for rule in alert_rules()}
    wait_for(lambda: all(r["health"] == "ok" for r in _rules(live.url)), "rules evaluated")


@pytest.mark.slow
def test_every_preparation_query_returns_data(
    tiny_example: Path, prometheus_dir: Path, tmp_path: Path
) -> None:
    """A real `chatflow prepare` of the tiny example (into a cache of its own, so it has work to
    do), scraped every second with the labels the preparations' PodMonitor gives its pod. It ends
    in seconds, so each query is asked whether it had data at any time since."""
    port = free_port()
    manifest = tiny_manifest(tiny_example, tmp_path / "tiny.yaml", training={"metricsPort": port})
    namespace = "ml"
    scrape = [_static(queries.PREPARATION_JOB, port, namespace=namespace)]
    with _prometheus(prometheus_dir, tmp_path, scrape) as url:
        prepared = subprocess.run(
            [Path(sys.executable).parent / "chatflow", "prepare", "-f", str(manifest),
             "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out"),
             "--workers", "1", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        exprs = [e for e in dashboard_queries() + rule_selectors() if preparing(e)]
        assert exprs
        ever = {
            e: f"last_over_time(({queries.fill(e, run=RUN, namespace=namespace, window='10s')})"
            "[10m:1s])"
            for e in exprs
        }
        assert [e for e, asked in ever.items() if not query(url, asked)] == []
        # The dashboard's variables offer a run that is only preparing.
        offered = query(url, "last_over_time(chatflow_prepare_shards_total[10m])")
        assert {s["metric"]["run"] for s in offered} == {RUN}


# The GPUs of the run's two pods, and of another job's pod in the same namespace; GPU 1 of the
# worker reports XID 79 (fallen off the bus).
RUN_GPUS = {("tiny-0123abcd-master-0", "0"), ("tiny-0123abcd-master-0", "1"),
            ("tiny-0123abcd-worker-0", "0"), ("tiny-0123abcd-worker-0", "1")}  # fmt: skip
OTHER_GPU = ("other-89abcdef-worker-0", "0")
XID = {("tiny-0123abcd-worker-0", "1"): 79}


def dcgm_exposition() -> str:
    """What NVIDIA's dcgm-exporter serves for these GPUs, with its Kubernetes mapping on: its
    default counters' HELP and TYPE lines, and its labels."""
    counters = {
        "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", 97),
        "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", 61440),
        "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", 612.5),
        "DCGM_FI_DEV_XID_ERRORS": ("Value of the last XID error encountered.", 0),
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE":
            ("Ratio of cycles the tensor (HMMA) pipe is active.", 0.41),
    }  # fmt: skip
    lines = []
    for name, (help_text, value) in counters.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for number, (pod, gpu) in enumerate(sorted(RUN_GPUS | {OTHER_GPU})):
            labels = (
                f'gpu="{gpu}",UUID="GPU-{number:08x}",pci_bus_id="00000000:{number:02X}:00.0",'
                f'device="nvidia{gpu}",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-{pod[-1]}",'
                f'DCGM_FI_DRIVER_VERSION="550.54.15",container="pytorch",namespace="ml",pod="{pod}"'
            )
            if name == "DCGM_FI_DEV_XID_ERRORS":
                value = XID.get((pod, gpu), 0)
            lines.append(f"{name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


def test_gpu_panels_and_the_xid_alert_on_dcgm_series(prometheus_dir: Path, tmp_path: Path) -> None:
    """Prometheus scrapes DCGM's exposition (honoring its pod labels, as the GPU operator's
    ServiceMonitor does) and the run's trainer series. Every GPU panel shows the run's GPUs and no
    other job's; the XID alert fires for the one GPU that reported an error, naming the run."""
    pages = {
        "/dcgm": dcgm_exposition(),
        "/trainer": f'# TYPE chatflow_step gauge\nchatflow_step{{run="{RUN}"}} 7\n',
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _pages_handler(pages))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    scrape = [
        {**_static("dcgm-exporter", port), "metrics_path": "/dcgm", "honor_labels": True},
        {**_static(queries.TRAINER_JOB, port, namespace="ml"), "metrics_path": "/trainer"},
    ]
    try:
        with _prometheus(prometheus_dir, tmp_path, scrape, rules=MONITORING / "rules.yaml") as url:
            gpu_panels = [e for e in dashboard_queries() if "DCGM_" in e]
            assert len(gpu_panels) == 6
            filled = [queries.fill(e, run=RUN, namespace="ml") for e in gpu_panels]
            wait_for(lambda: all(query(url, e) for e in filled), "data for every GPU panel")
            run_pods = {pod for pod, _ in RUN_GPUS}
            for expr in filled:
                pods = {s["metric"].get("pod") for s in query(url, expr)}
                assert pods <= run_pods | {None}, expr
            xid = query(url, queries.fill(queries.GPU_XID.expr, run=RUN, namespace="ml"))
            errors = {(s["metric"]["pod"], s["metric"]["gpu"]): float(s["value"][1]) for s in xid}
            assert errors == {gpu: XID.get(gpu, 0) for gpu in RUN_GPUS}

            def firing() -> list[dict]:
                with urllib.request.urlopen(f"{url}/api/v1/alerts") as response:
                    alerts = json.load(response)["data"]["alerts"]
                return [a for a in alerts if a["labels"]["alertname"] == "ChatFlowGPUXidError"]

            alert = wait_for(firing, "the XID alert")
            assert [
                (a["labels"]["pod"], a["labels"]["gpu"], a["labels"]["run"]) for a in alert
            ] == [("tiny-0123abcd-worker-0", "1", RUN)]
            assert "reported XID 79" in alert[0]["annotations"]["description"]
    finally:
        server.shutdown()


def _pages_handler(pages: dict[str, str]) -> type[BaseHTTPRequestHandler]:
    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[self.path].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Pages


@contextmanager
def _prometheus(
    prometheus_dir: Path, workdir: Path, scrape: list[dict], rules: Path | None = None
) -> Iterator[str]:
    """Prometheus scraping and evaluating every second, until the block ends: its URL."""
    web = f"127.0.0.1:{free_port()}"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": scrape,
        "rule_files": [str(rules)] if rules else [],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (workdir / "prometheus.log").open("w") as log:
        prometheus = subprocess.Popen(
            [prometheus_dir / "prometheus", f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address={web}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        wait_for(lambda: _ready(f"http://{web}"), "Prometheus to be ready")
        yield f"http://{web}"
    finally:
        _stop(prometheus)


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
