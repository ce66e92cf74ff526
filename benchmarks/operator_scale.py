"""200 ChatFlowRuns at once: how fast the operator turns them into PyTorchJobs.

On the test control plane (tests/controlplane: real etcd, kube-apiserver, controller manager), in
one run:

  floor     this process creates the 200 PyTorchJobs the operator would render, one after another
            with the Python client: the least any operator could take for them.
  operator  this process creates the 200 ChatFlowRuns the same way, while `chatflow-operator run`
            (as its ServiceAccount) reconciles them into ConfigMaps, PyTorchJobs and statuses.

Timed from the first create to the moment a watch (opened beforehand, in this process) sees the
200th PyTorchJob. Apply-to-child latency per run: the watch's arrival time of its PyTorchJob minus
the moment its ChatFlowRun's create returned. The operator's peak RSS is VmHWM of its process.
Each side runs in a fresh namespace; `--rounds` alternates them and reports each round.

    .venv/bin/python benchmarks/operator_scale.py [--runs 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from chatflow_operator.backends import pytorchjob  # noqa: E402
from cluster import Operator, install_operator_manifests  # noqa: E402
from controlplane import ControlPlane  # noqa: E402
from factories import run_document  # noqa: E402


class JobWatch:
    """Records when each PyTorchJob of a namespace is first seen."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, expected: int) -> None:
        self.seen: dict[str, float] = {}
        self.done = threading.Event()
        self._objects = kubernetes.client.CustomObjectsApi(api)
        self._namespace, self._expected = namespace, expected
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _watch(self) -> None:
        listing = self._objects.list_namespaced_custom_object(
            "kubeflow.org", "v1", self._namespace, "pytorchjobs"
        )
        watch = kubernetes.watch.Watch()
        self._ready.set()
        for event in watch.stream(
            self._objects.list_namespaced_custom_object,
            "kubeflow.org", "v1", self._namespace, "pytorchjobs",
            resource_version=listing["metadata"]["resourceVersion"],
        ):  # fmt: skip
            if event["type"] == "ADDED":
                self.seen.setdefault(event["object"]["metadata"]["name"], time.perf_counter())
                if len(self.seen) >= self._expected:
                    self.done.set()
                    watch.stop()


def runs(namespace: str, count: int) -> list[dict[str, Any]]:
    documents = []
    for i in range(count):
        document = run_document(nodes=4, gpusPerNode=8)
        document["metadata"] = {"name": f"run-{i:03d}", "namespace": namespace}
        documents.append(document)
    return documents


def create_namespace(api: kubernetes.client.ApiClient, name: str) -> None:
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})


def floor(api: kubernetes.client.ApiClient, namespace: str, count: int) -> dict[str, float]:
    """Create the PyTorchJobs directly: the rendered job of each run, with a made-up owner."""
    create_namespace(api, namespace)
    objects = kubernetes.client.CustomObjectsApi(api)
    jobs = []
    for document in runs(namespace, count):
        document["metadata"] |= {"uid": "00000000-0000-0000-0000-000000000000"}
        job = pytorchjob.render_job(document)
        del job["metadata"]["ownerReferences"]  # no such owner: the collector would delete them
        jobs.append(job)
    watch = JobWatch(api, namespace, count)
    start = time.perf_counter()
    for job in jobs:
        objects.create_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", job)
    watch.done.wait(timeout=300)
    return {"total_s": max(watch.seen.values()) - start}


def with_operator(api: kubernetes.client.ApiClient, namespace: str, count: int) -> dict[str, float]:
    create_namespace(api, namespace)
    objects = kubernetes.client.CustomObjectsApi(api)
    documents = runs(namespace, count)
    watch = JobWatch(api, namespace, count)
    created: dict[str, float] = {}
    start = time.perf_counter()
    for document in documents:
        objects.create_namespaced_custom_object(
            "chatflow.io", "v1alpha1", namespace, "chatflowruns", document
        )
        created[document["metadata"]["name"]] = time.perf_counter()
    if not watch.done.wait(timeout=300):
        raise RuntimeError(f"only {len(watch.seen)} of {count} jobs appeared")
    latencies = sorted(watch.seen[name] - created[name.rsplit("-", 1)[0]] for name in watch.seen)
    return {
        "total_s": max(watch.seen.values()) - start,
        "create_loop_s": max(created.values()) - start,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))],
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, ControlPlane(Path(tmp) / "cp") as cp:
        cp.install_pytorchjob_crd()
        install_operator_manifests(cp)
        api = cp.api_client()
        operator = Operator(cp, Path(tmp)).start()
        results = []
        try:
            for round_ in range(args.rounds):
                base = floor(api, f"floor-{round_}", args.runs)
                ours = with_operator(api, f"operator-{round_}", args.runs)
                result = {
                    "round": round_,
                    "floor_s": round(base["total_s"], 3),
                    "operator_s": round(ours["total_s"], 3),
                    "ratio": round(ours["total_s"] / base["total_s"], 2),
                    "create_loop_s": round(ours["create_loop_s"], 3),
                    "p50_s": round(ours["p50_s"], 3),
                    "p99_s": round(ours["p99_s"], 3),
                }
                results.append(result)
                print(json.dumps(result), flush=True)
            assert operator.process is not None
            rss = peak_rss_mb(operator.process.pid)
        finally:
            operator.stop()
    print(json.dumps({"runs": args.runs, "operator_peak_rss_mb": round(rss, 1)}))


if __name__ == "__main__":
    main()
