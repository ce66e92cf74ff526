"""The TrainJob backend as pure functions (no cluster): the TrainJob rendered for a run, the
ClusterTrainingRuntime it runs on, the in-place patch, and the run's phase read from what Trainer
v2.3.0 writes (shapes observed from the real controller)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from chatflow.spec import SpecError, parse_run
from chatflow_operator import render
from chatflow_operator.backends import trainjob
from test_render import cluster_run


def trainjob_run(**spec: Any) -> dict[str, Any]:
    """The 32-GPU run as a TrainJob: without what that backend refuses."""
    scheduling = {"nodeSelector": {"gpu": "h100"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}  # fmt: skip
    return cluster_run(**{"backend": "trainjob", "scheduling": scheduling, "runPolicy": {}, **spec})


def test_trainjob_runs_the_trainer_on_the_chatflow_runtime_with_the_runs_pod() -> None:
    run = trainjob_run()
    job = trainjob.render_job(run)
    name = render.job_name(run)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["metadata"]["name"] == name
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "chatflow", "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"
    }  # fmt: skip
    assert spec["suspend"] is False and "activeDeadlineSeconds" not in spec
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example/trainer:1"
    assert trainer["command"][:3] == ["python", "-m", "chatflow.train.torchrun"]
    assert "--prepared" in trainer["args"]  # the dataset-initializer ran first
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "HF_TOKEN"}.items() <= trainer["env"][1].items()

    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "chatflow.io/operator"
    _, node = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]
    assert pod["metadata"]["labels"]["chatflow.io/run"] == "test"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"] == {"name": name}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "llm-data"}
    assert pod["spec"]["containers"][0]["name"] == "node"
    assert {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]} >= {
        "/etc/chatflow", "/mnt/llm", "/dev/shm"
    }  # fmt: skip
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_dataset_initializer_prepares_onto_the_runs_volume() -> None:
    run = trainjob_run()
    spec = trainjob.render_job(run)["spec"]
    env = {e["name"]: e for e in spec["initializer"]["dataset"]["env"]}
    assert env["CHATFLOW_OUTPUT"]["value"] == "/mnt/llm/runs/test"
    assert env["CHATFLOW_CACHE_DIR"]["value"] == "/mnt/llm/cache"
    assert env["CHATFLOW_METRICS_PORT"]["value"] == "9400"
    assert env["HF_HOME"]["value"] == "/mnt/llm/cache/huggingface"
    assert "secretKeyRef" in env["HF_TOKEN"]["valueFrom"]  # the run's env, e.g. to download
    (patch,) = spec["runtimePatches"]
    initializer = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert initializer["name"] == "dataset-initializer"
    pod = initializer["template"]["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "preparation"
    (container,) = pod["spec"]["containers"]
    # The run's volume, under the name Trainer's webhook requires of an initializer's.
    assert container == {"name": "dataset-initializer", "volumeMounts": [
        {"name": "config", "mountPath": "/etc/chatflow", "readOnly": True},
        {"name": "initializer", "mountPath": "/mnt/llm"},
    ]}  # fmt: skip
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["initializer"]["persistentVolumeClaim"] == {"claimName": "llm-data"}
    assert pod["spec"]["securityContext"]["fsGroup"] == 65532
    # CPU work: tolerations, but not the GPU nodes' selector.
    assert "nodeSelector" not in pod["spec"] and pod["spec"]["tolerations"]


def test_one_variable_of_each_name_the_last_given() -> None:
    run = trainjob_run(env=[{"name": "HF_HOME", "value": "/mine"}, {"name": "A", "value": "1"}])
    spec = trainjob.render_job(run)["spec"]
    for env in (spec["trainer"]["env"], spec["initializer"]["dataset"]["env"]):
        names = [e["name"] for e in env]
        assert len(names) == len(set(names)) and {"name": "HF_HOME", "value": "/mine"} in env


def test_the_runtime_prepares_then_trains_and_resumes_preempted_pods() -> None:
    runtime = trainjob.runtime("registry.example/trainer:1")
    assert (runtime["kind"], runtime["metadata"]["name"]) == ("ClusterTrainingRuntime", "chatflow")
    initializer, node = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["dependsOn"] == [{"name": "dataset-initializer", "status": "Complete"}]
    for job, container in ((initializer, "dataset-initializer"), (node, "node")):
        pod = job["template"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"  # as podFailurePolicy requires
        assert pod["containers"][0]["name"] == container
        assert pod["containers"][0]["image"] == "registry.example/trainer:1"
        assert job["template"]["spec"]["podFailurePolicy"] == render.pod_failure_policy(container)
        assert pod["automountServiceAccountToken"] is False
        assert pod["containers"][0]["ports"] == [{"name": "metrics", "containerPort": 9400}]
    assert initializer["template"]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "chatflow", "prepare"
    ]  # fmt: skip
    assert runtime["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"storage": None}, "spec.storage: required with backend trainjob"),
        ({"scheduling": {"priorityClassName": "x"}}, "spec.scheduling.priorityClassName: not"),
        ({"runPolicy": {"backoffLimit": 1}}, "spec.runPolicy.backoffLimit: not supported"),
        ({"runPolicy": {"ttlSecondsAfterFinished": 1}}, "spec.runPolicy.ttlSecondsAfterFinished"),
    ],
)
def test_what_a_trainjob_cannot_take_is_refused_naming_the_field(
    change: dict[str, Any], field: str
) -> None:
    run = trainjob_run()
    run["spec"] |= change
    if change.get("storage", 1) is None:
        del run["spec"]["storage"]
    with pytest.raises(SpecError, match=re.escape(field)):
        parse_run(run)


def test_in_place_patch_takes_suspend_and_the_deadline() -> None:
    run = trainjob_run()
    job = trainjob.render_job(run)
    assert trainjob.in_place_patch(run, job) is None
    later = trainjob_run(suspend=True, runPolicy={"activeDeadlineSeconds": 3600})
    assert trainjob.in_place_patch(later, job) == {
        "spec": {"suspend": True, "activeDeadlineSeconds": 3600}
    }
    assert trainjob.in_place_patch(run, trainjob.render_job(later)) == {
        "spec": {"suspend": False, "activeDeadlineSeconds": None}
    }
    # The CRD refuses a changed deadline: removed on one pass, set on the next.
    longer = trainjob_run(runPolicy={"activeDeadlineSeconds": 7200})
    job = trainjob.render_job(later)
    job["spec"]["suspend"] = False
    assert trainjob.in_place_patch(longer, job) == {"spec": {"activeDeadlineSeconds": None}}
    del job["spec"]["activeDeadlineSeconds"]
    assert trainjob.in_place_patch(longer, job) == {"spec": {"activeDeadlineSeconds": 7200}}


def _job(*conditions: dict[str, Any], **counts: dict[str, int]) -> dict[str, Any]:
    """A TrainJob's status: `conditions`, and the pod counts of its `node` and
    `dataset_initializer` jobs."""
    zero = {"active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}
    jobs = [
        {"name": name, **zero, **counts.get(name.replace("-", "_"), {})}
        for name in ("node", "dataset-initializer")
    ]
    return {"status": {"conditions": list(conditions), "jobsStatus": jobs}}


def _condition(type: str, status: str, reason: str, at: str = "2026-12-07T20:22:38Z") -> dict:
    return {"type": type, "status": status, "reason": reason, "message": "m",
            "lastTransitionTime": at}  # fmt: skip


def test_phase_from_conditions_and_the_jobs_counts() -> None:
    assert trainjob.state(None, 1).phase == "Pending"
    assert trainjob.state(_job(), 1).phase == "Pending"
    preparing = trainjob.state(_job(dataset_initializer={"active": 1}), 1)
    assert (preparing.phase, preparing.preparing) == ("Preparing", True)
    running = trainjob.state(_job(node={"active": 1}, dataset_initializer={"succeeded": 1}), 1)
    assert (running.phase, running.preparing) == ("Running", False)
    resumed = _condition("Suspended", "False", "Resumed")
    assert trainjob.state(_job(resumed, node={"active": 1}), 1).phase == "Running"
    suspended = _condition("Suspended", "True", "Suspended")
    assert trainjob.state(_job(suspended, node={"suspended": 1}), 1).phase == "Suspended"
    complete = _condition("Complete", "True", "AllJobsCompleted")
    done = trainjob.state(_job(complete, node={"succeeded": 1}), 4)
    assert done.phase == "Succeeded" and done.completion_time == "2026-12-07T20:22:38Z"
    assert [(c.type, c.observed_generation) for c in done.conditions] == [("Complete", 4)]
    failed = _condition("Failed", "True", "FailedJobs")
    trainer_failed = trainjob.state(_job(failed, node={"failed": 1}), 1)
    assert (trainer_failed.phase, trainer_failed.preparing) == ("Failed", False)
    # The nodes never started: the preparation failed.
    preparation_failed = trainjob.state(_job(failed, dataset_initializer={"failed": 1}), 1)
    assert (preparation_failed.phase, preparation_failed.preparing) == ("Failed", True)


def test_rank0_is_completion_index_0_of_the_node_job() -> None:
    assert trainjob.rank0_pods("test-abc") == (
        "jobset.sigs.k8s.io/jobset-name=test-abc,jobset.sigs.k8s.io/replicatedjob-name=node,"
        "batch.kubernetes.io/job-completion-index=0"
    )
    assert trainjob.preparation_pods("test-abc") == (
        "jobset.sigs.k8s.io/jobset-name=test-abc,"
        "jobset.sigs.k8s.io/replicatedjob-name=dataset-initializer"
    )
