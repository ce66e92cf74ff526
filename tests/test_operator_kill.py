"""The operator SIGKILLed at random moments while runs are created and their specs change.

Whatever pass a kill interrupts, the passes after the last restart must leave every run exactly the
children its current spec names. Against the real control plane of tests/controlplane: no training
operator or kubelet runs, so PyTorchJobs are stored objects whose pods never start.
"""

from __future__ import annotations

import copy
import os
import random
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatflow_operator import render
from cluster import REPO, TIMEOUT, Operator, items
from controlplane import ControlPlane

TINY = REPO / "manifests" / "examples" / "tiny.yaml"
JOBS = "pytorchjobs.kubeflow.org"
RUNS = "chatflowruns.chatflow.io"
RUN_COUNT = 10
KILLS = 15
MAX_KILL_DELAY_SECONDS = 1.5
# Set to rerun the sequence of changes and kill delays of a failed run (the timing of the
# operator's passes against them still varies).
SEED_VARIABLE = "CHATFLOW_KILL_SEED"

pytestmark = pytest.mark.cluster


def changed(spec: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The spec with one change: half of them restart-worthy (a new job name), half in place."""
    spec = copy.deepcopy(spec)
    choice = rng.random()
    if choice < 0.5:
        spec["nodes"] = rng.choice([n for n in (1, 2, 3) if n != spec["nodes"]])
    elif choice < 0.75:
        spec["suspend"] = not spec["suspend"]
    else:
        spec["runPolicy"] = {"backoffLimit": rng.randint(0, 9)}
    return spec


def apply_runs(cp: ControlPlane, namespace: str, specs: dict[str, dict[str, Any]]) -> None:
    """kubectl apply the tiny example under each name, with its spec fields replaced."""
    base = yaml.safe_load(TINY.read_text())
    documents = []
    for name, spec in specs.items():
        document = copy.deepcopy(base)
        document["metadata"]["name"] = name
        document["spec"] |= spec
        documents.append(document)
    cp.kubectl("apply", f"--namespace={namespace}", "-f", "-", input=yaml.safe_dump_all(documents))


def divergence(cp: ControlPlane, namespace: str) -> dict[str, dict[str, Any]]:
    """Each run that has other children than the job and ConfigMap its spec names, or a status
    that names another job, with what it has instead: empty once converged."""
    runs = items(cp, RUNS, namespace)
    # Every child, not just those carrying the run's label: nothing else may be the run's.
    children = {kind: items(cp, kind, namespace) for kind in (JOBS, "configmaps")}
    found = {}
    for run in runs:
        want = render.job_name(run)
        uid = run["metadata"]["uid"]
        have = {
            kind: sorted(
                child["metadata"]["name"]
                for child in objects
                if any(o["uid"] == uid for o in child["metadata"].get("ownerReferences") or [])
            )
            for kind, objects in children.items()
        }
        have["status.jobName"] = (run.get("status") or {}).get("jobName")
        if have != {JOBS: [want], "configmaps": [want], "status.jobName": want}:
            found[run["metadata"]["name"]] = {"want": want, **have}
    return found


def test_killed_at_random_moments_leaves_exactly_the_current_children(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get(SEED_VARIABLE) or secrets.randbits(32))
    print(f"{SEED_VARIABLE}={seed}")  # pytest shows it when the test fails
    rng = random.Random(seed)
    specs = {
        f"run-{i}": {"nodes": 1, "suspend": False, "runPolicy": {"backoffLimit": 3}}
        for i in range(RUN_COUNT)
    }
    created: set[str] = set()

    def create_or_change() -> None:
        """Create, or change the spec of, up to half of the runs at once."""
        batch = {}
        for name in rng.sample(sorted(specs), rng.randint(1, RUN_COUNT // 2)):
            if name in created:
                specs[name] = changed(specs[name], rng)
            batch[name] = specs[name]
        created.update(batch)
        apply_runs(cluster, namespace, batch)

    def sleep_until(moment: float) -> None:
        time.sleep(max(0.0, moment - time.monotonic()))

    operator = None
    try:
        for _ in range(KILLS):
            if rng.random() < 0.3:
                create_or_change()  # while no operator watches
            # Drawn before the operator starts, so a seed replays the same changes and kills.
            kill_after = rng.uniform(0, MAX_KILL_DELAY_SECONDS)
            changes = sorted(rng.uniform(0, kill_after) for _ in range(rng.randint(0, 3)))
            operator = Operator(cluster, tmp_path).start()
            started = time.monotonic()
            for change in [*changes, kill_after]:
                sleep_until(started + change)
                create_or_change()
            operator.kill()  # amid the passes of the last change
        if uncreated := {name: spec for name, spec in specs.items() if name not in created}:
            apply_runs(cluster, namespace, uncreated)
        operator = Operator(cluster, tmp_path).start()
        deadline = time.monotonic() + TIMEOUT
        while (diverged := divergence(cluster, namespace)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert diverged == {}, f"{SEED_VARIABLE}={seed}\n{operator.log()}"
    finally:
        if operator is not None:
            operator.stop()
        # Every later test's operator would otherwise reconcile these runs on startup.
        cluster.kubectl("delete", RUNS, "--all", f"--namespace={namespace}", "--wait=false")
