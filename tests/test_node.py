"""End to end on a real node (tests/node): the operator installed with helm from its image, the
tiny example applied as README's "Run on Kubernetes" says, its data prepared by a Job, the training
operator's pods training with our trainer image, and what users do to a running run (preemption,
suspend, resize).

A run's samples are compared with the plan (tests/outputs.global_batches): every step trains on
exactly its global batch, also when the job was interrupted, as an uninterrupted run does
(test_train checks that against a run on this host).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatflow.observability.queries import TRAINER_JOB
from cluster import REPO, free_port, wait_for
from node import Node
from outputs import global_batches, losses, samples

pytestmark = pytest.mark.node

RUN = "tiny"  # manifests/examples' run
TRAIN_TIMEOUT = 900  # seconds for a whole tiny run on two CPU pods
STEPS, GLOBAL_BATCH = 60, 16  # manifests/examples/tiny.yaml
# The interrupted runs checkpoint every 10 steps, and are interrupted after the first.
EARLY_CHECKPOINT = 10


def checkpoint_early(docs: dict[str, Any]) -> None:
    docs["ChatFlowRun"]["spec"]["training"]["checkpoint"]["everySteps"] = EARLY_CHECKPOINT


@pytest.fixture
def namespace(node: Node, request: pytest.FixtureRequest) -> Iterator[str]:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{secrets.token_hex(2)}"
    node.kubectl("create", "namespace", name)
    yield name
    node.kubectl("delete", "namespace", name, "--wait=false")


class Run:
    """The tiny example applied in a namespace, its volume a directory of this host."""

    def __init__(self, node: Node, namespace: str, volume: Path) -> None:
        self.node, self.namespace, self.volume = node, namespace, volume
        self.output = volume / "runs" / RUN

    def kubectl(self, *args: str, **kwargs: Any) -> Any:
        return self.node.kubectl(f"--namespace={self.namespace}", *args, **kwargs)

    def get(self, kind: str = "chatflowrun", name: str = RUN) -> dict[str, Any]:
        return json.loads(self.kubectl("get", kind, name, "-o", "json").stdout)

    def status(self) -> dict[str, Any]:
        return self.get().get("status", {})

    def patch(self, spec: dict[str, Any]) -> None:
        self.kubectl("patch", "chatflowrun", RUN, "--type=merge", "-p", json.dumps({"spec": spec}))

    def wait(self, what: str, done: Any, timeout: float = TRAIN_TIMEOUT) -> dict[str, Any]:
        """Until done(status); fails at once if the run fails unless that is what is awaited."""

        def check() -> dict[str, Any] | None:
            status = self.status()
            if done(status):
                return status
            if status.get("phase") == "Failed":
                raise AssertionError(f"the run failed: {json.dumps(status)}")
            return None

        try:
            return wait_for(check, what, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.diagnose()}") from None

    def wait_phase(self, *phases: str, timeout: float = TRAIN_TIMEOUT) -> dict[str, Any]:
        return self.wait(
            f"phase {' or '.join(phases)}", lambda s: s.get("phase") in phases, timeout
        )

    def wait_step(self, step: int) -> dict[str, Any]:
        """Until rank 0's metrics, read by the operator into status, show `step` done."""
        return self.wait(
            f"step {step} in status.progress",
            lambda s: s.get("phase") == "Running" and s.get("progress", {}).get("step", 0) >= step,
        )

    def wait_checkpoint(self, step: int) -> None:
        """Until the checkpoint of `step` is complete on the volume (its trainer state is
        written last), while the run goes on."""
        state = self.output / "checkpoints" / f"step-{step:08d}" / "trainer.json"
        self.wait(f"the checkpoint of step {step}", lambda _: state.exists())

    def pods(self, component: str | None = None) -> list[dict[str, Any]]:
        """The run's pods; those of one component (trainer, preparation) if given."""
        selector = f"chatflow.io/run={RUN}"
        if component:
            selector += f",app.kubernetes.io/component={component}"
        out = self.kubectl("get", "pods", "-l", selector, "-o", "json").stdout
        return json.loads(out)["items"]

    def events(self) -> set[str]:
        """The reasons of the run's Events: its phases among them."""
        out = self.kubectl("get", "events", "--field-selector", f"involvedObject.name={RUN}",
                           "-o", "json").stdout  # fmt: skip
        return {e["reason"] for e in json.loads(out)["items"]}

    def diagnose(self) -> str:
        """The run, its jobs and pods, and the pods' last log lines: for failure messages."""
        kinds = "cfr,jobs,pytorchjobs,trainjobs,jobsets,pods"
        parts = [self.kubectl("get", kinds, "-o", "wide", check=False).stdout]
        for pod in self.pods():
            name = pod["metadata"]["name"]
            logs = self.kubectl("logs", name, "--tail=25", "--all-containers", check=False)
            parts.append(f"--- {name}\n{logs.stdout}{logs.stderr}")
        return "\n".join(parts)


def apply_tiny(node: Node, namespace: str, change: Any = None) -> Run:
    """`kubectl apply -k manifests/examples` in the namespace, its claim bound to a fresh volume
    of the node; `change(docs)` may edit the kustomized objects first."""
    volume = node.add_volume(f"{namespace}-data", claim=(namespace, "tiny-data"))
    if change is None:
        node.kubectl(f"--namespace={namespace}", "apply", "-k", str(REPO / "manifests/examples"))
    else:
        built = node.kubectl("kustomize", str(REPO / "manifests/examples")).stdout
        docs = list(yaml.safe_load_all(built))
        change({doc["kind"]: doc for doc in docs})
        node.kubectl(f"--namespace={namespace}", "apply", "-f", "-",
                     input=yaml.safe_dump_all(docs))  # fmt: skip
    return Run(node, namespace, volume)


def assert_trained_exactly(run: Run, steps: int = STEPS) -> None:
    """Done, every step on its own global batch, and the final model loadable."""
    assert samples(run.output) == global_batches(steps, GLOBAL_BATCH)
    assert sorted(losses(run.output)) == list(range(1, steps + 1))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run.output / "model")
    tokenizer = AutoTokenizer.from_pretrained(run.output / "model")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def podmonitor_scrape_config(podmonitor: dict[str, Any], targets: Path) -> dict[str, Any]:
    """The scrape job the Prometheus Operator generates from a PodMonitor (no such operator runs
    here): pods kept by the monitor's label selector and port name, labelled
    namespace/pod/container, then the endpoint's own relabelings. Debian's Prometheus is built
    without Kubernetes discovery, so `discover_pods` writes the same targets and __meta labels
    to `targets` (file discovery) that `kubernetes_sd_configs` with role pod would find."""
    spec = podmonitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    keep = [
        {
            "action": "keep",
            "source_labels": [
                f"__meta_kubernetes_pod_label_{_label_name(key)}",
                f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}",
            ],
            "regex": f"({re.escape(value)});true",
        }
        for key, value in spec["selector"]["matchLabels"].items()
    ]
    keep.append(
        {
            "action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": endpoint["port"],
        }
    )
    meta = [
        {"source_labels": [f"__meta_kubernetes_{source}"], "target_label": target}
        for source, target in (
            ("namespace", "namespace"),
            ("pod_name", "pod"),
            ("pod_container_name", "container"),
        )
    ]
    # The monitor's camelCase keys (targetLabel, sourceLabels) are Prometheus' snake_case ones.
    relabel = [
        {re.sub("([A-Z])", r"_\1", key).lower(): value for key, value in rule.items()}
        for rule in endpoint.get("relabelings", [])
    ]
    return {
        "job_name": f"podMonitor/{podmonitor['metadata']['name']}",
        "scrape_interval": "2s",
        "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "2s"}],
        "relabel_configs": keep + meta + relabel,
    }


def _label_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def discover_pods(node: Node, targets: Path) -> None:
    """One target per container port of every pod with an IP, with the __meta labels of
    Prometheus' Kubernetes pod discovery; written atomically."""
    found = []
    for pod in json.loads(node.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]:
        ip = pod["status"].get("podIP")
        if not ip:
            continue
        labels = {
            "__meta_kubernetes_namespace": pod["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": pod["metadata"]["name"],
        }
        for key, value in pod["metadata"].get("labels", {}).items():
            labels[f"__meta_kubernetes_pod_label_{_label_name(key)}"] = value
            labels[f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}"] = "true"
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                found.append({
                    "targets": [f"{ip}:{port['containerPort']}"],
                    "labels": labels | {
                        "__meta_kubernetes_pod_container_name": container["name"],
                        "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    },
                })  # fmt: skip
    tmp = targets.with_suffix(".tmp")
    tmp.write_text(json.dumps(found))
    tmp.replace(targets)


@pytest.fixture
def prometheus(node: Node, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on the host (it reaches pod IPs over the bridge) scraping what
    manifests/monitoring's PodMonitor selects; its URL."""
    tools = subprocess.run(["bash", str(REPO / "tests/tools/prometheus.sh")], check=True,
                           capture_output=True, text=True).stdout.splitlines()[-1]  # fmt: skip
    podmonitor = yaml.safe_load((REPO / "manifests/monitoring/podmonitor.yaml").read_text())
    targets = tmp_path / "pods.json"
    discover_pods(node, targets)
    config = {"scrape_configs": [podmonitor_scrape_config(podmonitor, targets)]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{free_port()}"
    with (tmp_path / "prometheus.log").open("w") as log:
        process = subprocess.Popen(
            [f"{tools}/prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    stop = threading.Event()

    def keep_discovering() -> None:
        while not stop.wait(1):
            discover_pods(node, targets)

    discovery = threading.Thread(target=keep_discovering, daemon=True)
    discovery.start()
    try:
        wait_for(lambda: _ready(f"http://{web}", process, tmp_path / "prometheus.log"),
                 "Prometheus to be ready")  # fmt: skip
        yield f"http://{web}"
    finally:
        stop.set()
        discovery.join()
        process.terminate()
        process.wait(30)


def _ready(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"Prometheus exited:\n{log.read_text()[-2000:]}")
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]
    except OSError:
        return []


def test_tiny_example_trains_on_the_node(
    node: Node, release: str, namespace: str, prometheus: str
) -> None:
    run = apply_tiny(node, namespace)
    status = run.wait_step(1)
    job = status["jobName"]
    # With its volume, the data was prepared first: by a Job that had ended before the training
    # job was made, whose trainers only open the cache.
    assert "Preparing" in run.events()
    preparation = run.get("job", f"{job}-prep")
    assert preparation["status"]["succeeded"] == 1
    made = run.get("pytorchjob", job)["metadata"]["creationTimestamp"]
    assert preparation["status"]["completionTime"] <= made
    trainer = run.get("pytorchjob", job)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert "--prepared" in trainer["spec"]["containers"][0]["args"]
    # Prometheus found the master pod through the PodMonitor's rules, and only it.
    series = wait_for(
        lambda: query(prometheus, f'chatflow_samples_total{{namespace="{namespace}"}}'),
        "the trainer's metrics in Prometheus", 120,
    )  # fmt: skip
    assert [s["metric"]["pod"] for s in series] == [f"{job}-master-0"]
    assert series[0]["metric"]["job"] == TRAINER_JOB
    # Live: the operator (a pod) read rank 0's metrics from the master pod.
    assert status["phase"] == "Running"
    assert 0 < status["progress"]["fraction"] < 1
    roles = {
        p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in run.pods("trainer")
    }
    assert roles == {"master", "worker"}
    images = {c["image"] for p in run.pods() for c in p["spec"]["containers"]}
    assert images == {"ghcr.io/chatflow/trainer:0.1.0"}

    status = run.wait_phase("Succeeded")
    assert status["progress"]["fraction"] == 1.0
    assert status["progress"]["step"] == STEPS
    assert_trained_exactly(run)
    job = run.get("pytorchjob", status["jobName"])
    assert job["status"]["conditions"][-1]["type"] == "Succeeded"
    assert {"Preparing", "Running", "Succeeded"} <= run.events()


@pytest.mark.parametrize("role", ["worker", "master"])
def test_a_deleted_pod_restarts_the_job_from_its_checkpoint(
    node: Node, release: str, namespace: str, role: str
) -> None:
    run = apply_tiny(node, namespace, checkpoint_early)
    run.wait_checkpoint(EARLY_CHECKPOINT)
    job = run.status()["jobName"]
    run.kubectl("delete", "pod", f"{job}-{role}-0", "--wait=false")
    run.wait_phase("Succeeded")
    history = (run.output / "history.jsonl").read_text().splitlines()
    # Every start of the trainer records its precision at the step it starts from.
    starts = [r["step"] for r in map(json.loads, history) if r["event"] == "precision"]
    assert starts[0] == 0 and starts[-1] >= EARLY_CHECKPOINT, starts
    assert_trained_exactly(run)


def test_suspend_then_resume_continues_exactly(node: Node, release: str, namespace: str) -> None:
    run = apply_tiny(node, namespace, checkpoint_early)
    run.wait_checkpoint(EARLY_CHECKPOINT)
    run.patch({"suspend": True})
    run.wait_phase("Suspended", timeout=180)
    wait_for(lambda: not run.pods("trainer"), "the pods to go", 180)
    checkpoints = sorted((run.output / "checkpoints").glob("step-*"))
    assert checkpoints, "suspended without a checkpoint"
    run.patch({"suspend": False})
    run.wait_phase("Succeeded")
    assert_trained_exactly(run)


def test_more_nodes_replace_the_job_and_resume(node: Node, release: str, namespace: str) -> None:
    run = apply_tiny(node, namespace, checkpoint_early)
    run.wait_checkpoint(EARLY_CHECKPOINT)
    first_job = run.status()["jobName"]
    # 4 nodes x 1 process x microBatchSize 4 = the global batch of 16 (3 nodes would not divide
    # it: the trainer refuses that, naming spec.training.globalBatchSize); smaller requests, so
    # that four pods fit this 2-core node.
    resources = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "6Gi"}}
    run.patch({"nodes": 4, "resources": resources})
    status = run.wait_phase("Succeeded")
    assert status["jobName"] != first_job
    assert status["restarts"] >= 1
    job = run.get("pytorchjob", status["jobName"])
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert_trained_exactly(run)


def test_a_missing_data_path_fails_the_run_naming_the_field(
    node: Node, release: str, namespace: str
) -> None:
    def missing_path(docs: dict[str, Any]) -> None:
        docs["ChatFlowRun"]["spec"]["data"]["sources"][1]["path"] = "/nonexistent/zh.jsonl"

    run = apply_tiny(node, namespace, missing_path)
    status = run.wait_phase("Failed", timeout=300)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreparationFailed", failed
    assert "spec.data.sources[1].path" in failed["message"], failed
    assert "/nonexistent/zh.jsonl" in failed["message"], failed
    # Failed for good, in its preparation: one pod, not retried, and no training job made.
    (pod,) = run.pods()
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "preparation"
    assert pod["status"]["phase"] == "Failed"
    assert run.kubectl("get", "pytorchjobs", "-o", "name").stdout == ""


def test_tiny_example_as_a_trainjob_prepares_trains_survives_a_lost_pod_and_suspends(
    node: Node, release: str, namespace: str
) -> None:
    """On Kubeflow Trainer v2 (its manager and JobSet's, real): the runtime's dataset-initializer
    prepares the data before the nodes start; a deleted pod of node rank 0 and a suspend are
    both resumed from a checkpoint; the run ends Succeeded, trained exactly."""

    def as_trainjob(docs: dict[str, Any]) -> None:
        checkpoint_early(docs)
        docs["ChatFlowRun"]["spec"]["backend"] = "trainjob"

    run = apply_tiny(node, namespace, as_trainjob)
    run.wait_checkpoint(EARLY_CHECKPOINT)
    status = run.status()
    job = status["jobName"]
    assert {"Preparing", "Running"} <= run.events()
    trainjob = run.get("trainjob", job)
    assert trainjob["spec"]["runtimeRef"]["name"] == "chatflow"
    # The preparation ran once, in the initializer's pod, and had ended before the nodes began.
    (preparation,) = run.pods("preparation")
    assert preparation["status"]["phase"] == "Succeeded"
    prepared = preparation["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    trainers = run.pods("trainer")
    assert len(trainers) == 2
    assert all(p["metadata"]["creationTimestamp"] >= prepared for p in trainers)

    rank0 = ("jobset.sigs.k8s.io/replicatedjob-name=node,"
             "batch.kubernetes.io/job-completion-index=0")  # fmt: skip
    run.kubectl("delete", "pod", "-l", rank0, "--wait=false")
    history = run.output / "history.jsonl"

    def starts() -> list[int]:
        records = map(json.loads, history.read_text().splitlines())
        return [r["step"] for r in records if r["event"] == "precision"]

    run.wait("the trainers to resume after the lost pod",
             lambda _: len(starts()) >= 2 and starts()[-1] >= EARLY_CHECKPOINT)  # fmt: skip

    run.patch({"suspend": True})
    run.wait_phase("Suspended", timeout=180)

    def live() -> list[dict[str, Any]]:
        # The Job controller keeps failed pods (the lost pod's peer, which ended with 143).
        return [p for p in run.pods("trainer") if p["status"]["phase"] in ("Pending", "Running")]

    wait_for(lambda: not live(), "the pods to go", 180)
    run.patch({"suspend": False})
    status = run.wait_phase("Succeeded")
    assert status["jobName"] == job  # neither the lost pod nor suspend replaced the job
    assert status["progress"]["step"] == STEPS and status["progress"]["fraction"] == 1.0
    assert len(starts()) >= 3, starts()
    assert_trained_exactly(run)
    complete = run.get("trainjob", job)["status"]["conditions"]
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in complete), complete
