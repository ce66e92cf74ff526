"""ChatFlowRun -> ConfigMap + PyTorchJob (+ preparation Job), as pure functions (no cluster)."""

from __future__ import annotations

from typing import Any

import yaml

from chatflow.spec import parse_run
from chatflow_operator import render
from chatflow_operator.backends import pytorchjob
from factories import run_document


def stored_run(**spec: Any) -> dict[str, Any]:
    """A run as the API server hands it to the operator: namespaced, with a uid and generation."""
    run = run_document(**spec)
    run["metadata"] |= {"namespace": "ml", "uid": "uid-1", "generation": 1}
    return run


def cluster_run(**spec: Any) -> dict[str, Any]:
    return stored_run(
        **{
            "nodes": 4,
            "gpusPerNode": 8,
            "image": "registry.example/trainer:1",
            "resources": {
                "requests": {"cpu": "32", "memory": "512Gi"},
                "limits": {"memory": "1Ti"},
            },
            "storage": {"claimName": "llm-data", "mountPath": "/mnt/llm"},
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
            ],
            "scheduling": {
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                "affinity": {"nodeAffinity": {"x": 1}},
                "priorityClassName": "training",
            },
            "queueName": "team-a",
            "runPolicy": {"backoffLimit": 3, "ttlSecondsAfterFinished": 600},
            **spec,
        }
    )


def test_job_is_master_plus_workers_with_one_process_per_gpu() -> None:
    run = cluster_run()
    job = pytorchjob.render_job(run)
    name = render.job_name(run)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == name and name.startswith("test-")
    assert job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "chatflow.io/v1alpha1",
            "kind": "ChatFlowRun",
            "name": "test",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    labels = job["metadata"]["labels"]
    assert labels["chatflow.io/run"] == "test" and labels["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"] == {
        "suspend": False,
        "backoffLimit": 3,
        "ttlSecondsAfterFinished": 600,
    }
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    assert replicas["Master"]["restartPolicy"] == "ExitCode"

    pod = replicas["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["priorityClassName"] == "training"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 65532
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == "registry.example/trainer:1"
    assert container["command"] == [
        "python",
        "-m",
        "chatflow.train.torchrun",
        "-m",
        "chatflow.train",
    ]
    # With storage, the preparation Job has filled the cache before the trainer starts.
    assert container["args"] == [
        "--file", "/etc/chatflow/run.yaml",
        "--output", "/mnt/llm/runs/test",
        "--cache-dir", "/mnt/llm/cache",
        "--prepared",
    ]  # fmt: skip
    assert container["resources"] == {
        "requests": {"cpu": "32", "memory": "512Gi", "nvidia.com/gpu": 8},
        "limits": {"memory": "1Ti", "nvidia.com/gpu": 8},
    }
    assert {"name": "metrics", "containerPort": 9400} in container["ports"]
    assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token", "optional": False}},
    } in container["env"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"config": "/etc/chatflow", "data": "/mnt/llm", "dshm": "/dev/shm"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"] == {"name": name}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "llm-data"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}


def test_single_cpu_node_has_no_workers_and_no_gpus() -> None:
    job = pytorchjob.render_job(stored_run())
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert job["spec"]["nprocPerNode"] == "1"
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "resources" not in pod["containers"][0]
    assert {"name": "data", "emptyDir": {}} in pod["volumes"]
    # No storage: no preparation Job could hand its output over, so the trainer prepares.
    assert not render.prepares(stored_run())
    assert "--prepared" not in pod["containers"][0]["args"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_config_map_holds_the_run_for_the_trainer() -> None:
    run = cluster_run()
    config = render.config_map(run)
    assert config["metadata"]["name"] == render.job_name(run)
    assert config["immutable"] is True
    manifest = yaml.safe_load(config["data"]["run.yaml"])
    assert parse_run(manifest).spec == parse_run(run).spec


def test_only_restart_worthy_changes_rename_the_job() -> None:
    base = render.job_name(cluster_run())
    in_place = [{"suspend": True}, {"runPolicy": {"backoffLimit": 9}}]
    for change in in_place:
        assert render.job_name(cluster_run(**change)) == base, change
    restarting = [
        {"nodes": 8},
        {"gpusPerNode": 4},
        {"image": "registry.example/trainer:2"},
        {"resources": {"limits": {"memory": "2Ti"}}},
        {"schedule": {"curve": "points", "points": [{"at": 0, "weights": {"sft": 1}}]}},
        {"training": {"seqLength": 128, "globalBatchSize": 8, "maxSamples": 2000}},
    ]
    names = {render.job_name(cluster_run(**change)) for change in restarting}
    assert base not in names and len(names) == len(restarting)


def test_in_place_patch_toggles_suspend_and_drops_removed_run_policy_fields() -> None:
    run = cluster_run()
    job = pytorchjob.render_job(run)
    assert pytorchjob.in_place_patch(run, job) is None
    suspended = cluster_run(suspend=True, runPolicy={"backoffLimit": 3})
    assert pytorchjob.in_place_patch(suspended, job) == {
        "spec": {"runPolicy": {"suspend": True, "ttlSecondsAfterFinished": None}}
    }


def test_stale_children_are_the_runs_own_under_other_names() -> None:
    run = cluster_run(nodes=3)
    earlier = cluster_run(nodes=2)  # a replaced spec, whose children a killed pass left behind
    jobs = [pytorchjob.render_job(earlier), pytorchjob.render_job(run)]
    assert render.stale_children(run, jobs) == [jobs[0]]
    assert render.stale_children(cluster_run(nodes=3, suspend=True), jobs) == [jobs[0]]
    assert render.stale_children(run, jobs[1:]) == []

    # Only children the run controls: not one that merely carries its label, nor those of a
    # deleted run of the same name that garbage collection has yet to take.
    unowned = render.config_map(earlier)
    del unowned["metadata"]["ownerReferences"]
    predecessors = render.config_map(earlier)
    predecessors["metadata"]["ownerReferences"][0]["uid"] = "uid-0"
    left_behind = render.config_map(cluster_run(nodes=4))
    configs = [unowned, predecessors, render.config_map(run), left_behind]
    assert render.stale_children(run, configs) == [left_behind]


def test_preparation_job_runs_chatflow_prepare_on_the_runs_volume_and_cpus() -> None:
    run = cluster_run(data=run_document()["spec"]["data"] | {"preparation": {"workers": 6}})
    assert render.prepares(run)
    prep = render.preparation_job(run)
    name = render.job_name(run)
    assert (prep["apiVersion"], prep["kind"]) == ("batch/v1", "Job")
    assert prep["metadata"]["name"] == render.preparation_job_name(run) == f"{name}-prep"
    assert (
        prep["metadata"]["ownerReferences"]
        == pytorchjob.render_job(run)["metadata"]["ownerReferences"]
    )
    labels = prep["metadata"]["labels"]
    assert labels["chatflow.io/run"] == "test"
    assert labels["app.kubernetes.io/component"] == "preparation"
    assert "kueue.x-k8s.io/queue-name" not in labels  # the queue admits the GPU job
    spec = prep["spec"]
    assert spec["suspend"] is False and spec["backoffLimit"] == 3
    assert "completionMode" not in spec and "parallelism" not in spec  # one pod
    rules = {
        (rule["action"], *rule["onExitCodes"]["values"])
        for rule in spec["podFailurePolicy"]["rules"]
        if "onExitCodes" in rule
    }
    assert rules == {("FailJob", 2), ("Ignore", 143)}

    template = spec["template"]
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "preparation"
    pod = template["spec"]
    trainer = pytorchjob.render_job(run)["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"
    ]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == trainer["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    # Any node that tolerates it: the trainers' nodeSelector and affinity pick GPU nodes.
    assert pod["tolerations"] == trainer["tolerations"]
    assert pod["priorityClassName"] == "training"
    assert "nodeSelector" not in pod and "affinity" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes == {
        "config": {"name": "config", "configMap": {"name": name}},
        "data": {"name": "data", "persistentVolumeClaim": {"claimName": "llm-data"}},
    }
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/trainer:1"
    assert container["command"] == ["chatflow", "prepare"]
    assert container["args"] == [
        "-f", "/etc/chatflow/run.yaml",
        "--cache-dir", "/mnt/llm/cache",
        "--output", "/mnt/llm/runs/test",
        "--workers", "6",
        "--metrics-port", "9400",
    ]  # fmt: skip
    assert container["env"] == trainer["containers"][0]["env"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400}]
    assert {"name": "data", "mountPath": "/mnt/llm"} in container["volumeMounts"]
    assert container["resources"] == {
        "requests": {"cpu": 6, "memory": "12Gi"},
        "limits": {"cpu": 6, "memory": "12Gi"},
    }
    assert not any("nvidia.com/gpu" in r for r in container["resources"].values())


def test_preparation_resources_as_set_and_suspend_with_the_run() -> None:
    resources = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    data = run_document()["spec"]["data"] | {"preparation": {"resources": resources}}
    prep = render.preparation_job(cluster_run(data=data))
    (container,) = prep["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == resources

    running = render.preparation_job(cluster_run())
    assert render.suspend_patch(cluster_run(), running) is None
    assert render.suspend_patch(cluster_run(suspend=True), running) == {"spec": {"suspend": True}}
    suspended = render.preparation_job(cluster_run(suspend=True))
    assert suspended["spec"]["suspend"] is True
    assert suspended["metadata"]["name"] == running["metadata"]["name"]  # suspend is in place
    assert render.suspend_patch(cluster_run(), suspended) == {"spec": {"suspend": False}}


def test_stale_preparation_jobs_are_those_of_other_specs() -> None:
    run, earlier = cluster_run(nodes=3), cluster_run(nodes=2)
    preps = [render.preparation_job(earlier), render.preparation_job(run)]
    current = render.preparation_job_name(run)
    assert render.stale_children(run, preps, current) == [preps[0]]
    # Suspending changes neither name.
    assert render.stale_children(cluster_run(nodes=3, suspend=True), preps, current) == [preps[0]]
