"""The run's status from its job (read by the PyTorchJob backend) and its trainer's metrics, or
from its preparation Job and that one's metrics (pure functions, no cluster)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from chatflow import metric_names as names
from chatflow.spec import parse_run
from chatflow.train.metrics import TrainerMetrics
from chatflow_operator import status
from chatflow_operator.backends import pytorchjob
from factories import run_document

NOW = "2026-11-22T12:00:00Z"


def condition(type: str, at: str, value: str = "True", message: str = "") -> dict[str, Any]:
    return {
        "type": type,
        "status": value,
        "reason": f"PyTorchJob{type}",
        "message": message or f"job is {type.lower()}",
        "lastUpdateTime": at,
        "lastTransitionTime": at,
    }


def job(*conditions: dict[str, Any], **job_status: Any) -> dict[str, Any]:
    return {"status": {"conditions": list(conditions), **job_status}}


def stored_run(**status_fields: Any) -> dict[str, Any]:
    run = run_document()
    run["metadata"] |= {"namespace": "ml", "uid": "u", "generation": 3}
    if status_fields:
        run["status"] = status_fields
    return run


def test_phase_follows_the_newest_true_condition() -> None:
    created = condition("Created", "2026-01-01T00:00:00Z")
    running = condition("Running", "2026-01-01T00:00:05Z")
    assert pytorchjob.state(None, 3).phase == "Pending"
    assert pytorchjob.state(job(created), 3).phase == "Pending"
    assert pytorchjob.state(job(created, running), 3).phase == "Running"
    restarting = condition("Restarting", "2026-01-01T00:01:00Z")
    stale_running = condition("Running", "2026-01-01T00:00:05Z", "False")
    assert pytorchjob.state(job(created, stale_running, restarting), 3).phase == "Restarting"
    # Set in the same second, the terminal condition wins.
    succeeded = condition("Succeeded", "2026-01-01T00:00:05Z")
    assert pytorchjob.state(job(created, running, succeeded), 3).phase == "Succeeded"
    failed = condition("Failed", "2026-01-01T00:09:00Z")
    assert pytorchjob.state(job(created, running, failed), 3).phase == "Failed"
    suspended = condition("Suspended", "2026-01-01T00:09:00Z")
    assert pytorchjob.state(job(created, stale_running, suspended), 3).phase == "Suspended"


def test_status_mirrors_the_job_with_observed_generation() -> None:
    the_job = job(
        condition("Created", "2026-01-01T00:00:00Z"),
        condition("Running", "2026-01-01T00:00:05Z"),
        startTime="2026-01-01T00:00:05Z",
    )
    state = pytorchjob.state(the_job, 3)
    new = status.run_status(stored_run(), "test-abc", state, restarts=1, now=NOW)
    assert new["phase"] == "Running" and new["observedGeneration"] == 3
    assert new["jobName"] == "test-abc" and new["restarts"] == 1
    assert new["startTime"] == "2026-01-01T00:00:05Z"
    assert [c["type"] for c in new["conditions"]] == ["Created", "Running"]
    assert new["conditions"][1]["reason"] == "PyTorchJobRunning"
    assert all(c["observedGeneration"] == 3 for c in new["conditions"])


def test_replacing_a_job_is_restarting_and_keeps_progress() -> None:
    progress = {"fraction": 0.5, "scheduleFraction": 0.6, "step": 10, "samples": 80}
    old = stored_run(phase="Running", progress=progress | {"tokens": 5120, "updatedAt": NOW})
    new = status.run_status(old, "test-new", None, replacing="test-old", restarts=2, now=NOW)
    assert new["phase"] == "Restarting"
    restarting = next(c for c in new["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == "SpecChanged" and "test-old" in restarting["message"]
    assert new["progress"]["step"] == 10
    assert status.transition(old["status"], new) == (
        "Restarting",
        "Running -> Restarting: replacing job test-old; "
        "test-new resumes from its newest checkpoint",
    )
    assert status.transition(new, new) is None


def test_progress_is_read_from_the_trainers_metrics_page() -> None:
    run = parse_run(run_document())
    metrics = TrainerMetrics("test", run.spec.data.sources, peak_flops=None)
    assert (
        status.progress_from_metrics(generate_latest(metrics.registry).decode(), 800, NOW) is None
    )
    metrics.schedule(0.25, 0, "growth", target=[0.4, 0.3, 0.2, 0.1], realised=[0.5, 0.25, 0.25, 0])
    metrics.consumed(samples=[100, 60, 30, 10], tokens=[6400, 3840, 1920, 640], epochs=[1] * 4)
    metrics.step(25, 2.0, 1e-4, 1.0, 8.0, 512.0, None)
    metrics.checkpoint(20, 1.5)
    text = generate_latest(metrics.registry).decode()
    progress = status.progress_from_metrics(text, total_samples=800, now=NOW)
    assert progress is not None
    assert progress.model_dump(by_alias=True, exclude_none=True) == {
        "fraction": 0.25,
        "scheduleFraction": 0.25,
        "schedulePhase": "growth",
        "step": 25,
        "samples": 200,
        "tokens": 12800,
        "targetWeights": {"en-web": 0.4, "zh-web": 0.3, "zh-en": 0.2, "sft": 0.1},
        "lastCheckpointStep": 20,
        "updatedAt": NOW,
    }


def test_a_failed_run_says_what_its_trainer_said_and_keeps_it() -> None:
    error = "spec.data.sources[1].path: no such file or directory: /nonexistent/zh.jsonl"
    master = {
        "status": {
            "containerStatuses": [
                {"name": "pytorch", "state": {"terminated": {"exitCode": 2, "message": error}}}
            ]
        }
    }
    preempted = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 143}}}]}}
    assert status.trainer_error([preempted, master]) == error
    assert status.trainer_error([preempted]) is None

    failed = pytorchjob.state(job(condition("Running", NOW, "False"), condition("Failed", NOW)), 3)
    first = status.run_status(stored_run(), "j", failed, trainer_error=error, now=NOW)
    (condition_,) = [c for c in first["conditions"] if c["type"] == "Failed"]
    assert (condition_["reason"], condition_["message"]) == ("TrainerError", error)
    # The pods are gone on a later pass: the message stays.
    later = status.run_status(stored_run(**first), "j", failed, now=NOW)
    assert later["conditions"] == first["conditions"]


def test_a_finished_run_takes_its_final_step_from_the_trainers_last_word() -> None:
    """The last scrape of the metrics came before the last steps; the trainer's termination
    message on success has them."""
    last_scrape = status.MixtureProgress(
        fraction=0.98, schedule_fraction=1.0, step=59, samples=944, tokens=120_832, updated_at=NOW
    )
    final = '{"step": 60, "samples": 960, "tokens": 122880}'
    master = {"status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": 0, "message": final}}}
    ]}}  # fmt: skip
    done = status.final_progress([master], last_scrape, 960, NOW)
    assert (done.fraction, done.step, done.samples, done.tokens) == (1.0, 60, 960, 122_880)
    assert done.schedule_fraction == 1.0
    # An older trainer's message, or none: the last scrape stands.
    older = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 0}}}]}}
    assert status.final_progress([older], last_scrape, 960, NOW) == last_scrape


def batch_job(*conditions: dict[str, Any]) -> dict[str, Any]:
    """A preparation Job as the API server holds it, with the Job controller's conditions."""
    return {
        "metadata": {"name": "test-abc-prep", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"conditions": list(conditions)},
    }


def test_preparing_runs_follow_their_preparation_job() -> None:
    assert status.preparation_phase(batch_job()) == "Preparing"
    suspended = condition("Suspended", "2026-01-01T00:01:00Z", message="Job suspended")
    assert status.preparation_phase(batch_job(suspended)) == "Suspended"
    resumed = condition("Suspended", "2026-01-01T00:02:00Z", "False", message="Job resumed")
    assert status.preparation_phase(batch_job(resumed)) == "Preparing"
    complete = condition("Complete", "2026-01-01T00:03:00Z")
    assert status.preparation_phase(batch_job(resumed, complete)) == "Succeeded"

    new = status.run_status(stored_run(), "test-abc", None, preparing=batch_job(), now=NOW)
    assert new["phase"] == "Preparing" and new["jobName"] == "test-abc"
    (preparing,) = new["conditions"]
    assert (preparing["type"], preparing["reason"]) == ("Preparing", "PreparationStarted")
    assert preparing["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # stable across passes
    assert status.transition(None, new) == (
        "Preparing",
        "New -> Preparing: Job test-abc-prep prepares the data",
    )
    paused = status.run_status(
        stored_run(**new), "test-abc", None, preparing=batch_job(suspended), now=NOW
    )
    assert paused["phase"] == "Suspended"
    assert paused["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:01:00Z"


def test_a_failed_preparation_fails_the_run_with_what_its_pod_said() -> None:
    error = "spec.data.sources[1].path: no such file or directory: /nonexistent/zh.jsonl"
    pod = {"status": {"containerStatuses": [
        {"name": "prepare", "state": {"terminated": {"exitCode": 2, "message": error + "\n"}}}
    ]}}  # fmt: skip
    failed = batch_job(
        condition("FailureTarget", "2026-01-01T00:01:00Z"),
        condition("Failed", "2026-01-01T00:01:01Z", message="Container prepare failed with 2"),
    )
    new = status.run_status(
        stored_run(phase="Preparing"), "test-abc", None, preparing=failed,
        trainer_error=status.trainer_error([pod]), now=NOW,
    )  # fmt: skip
    assert new["phase"] == "Failed"
    (failure,) = new["conditions"]
    assert (failure["type"], failure["reason"], failure["message"]) == (
        "Failed",
        "PreparationFailed",
        error,
    )
    assert status.transition({"phase": "Preparing"}, new) == (
        "Failed",
        f"Preparing -> Failed: {error}",
    )
    # Its pods gone (or out of memory, with nothing said): the Job's own word.
    bare = status.run_status(stored_run(), "test-abc", None, preparing=failed, now=NOW)
    assert bare["conditions"][0]["message"] == (
        "Job test-abc-prep failed: Container prepare failed with 2"
    )


def test_preparation_progress_is_summed_over_sources_from_its_metrics_page() -> None:
    registry = CollectorRegistry()
    labels = names.PREPARE_LABELS
    metrics = {
        name: kind(name, "help", labels, registry=registry)
        for name, kind in (
            (names.PREPARE_DOCUMENTS, Counter),
            (names.PREPARE_TOKENS, Counter),
            (names.PREPARE_READ_BYTES, Counter),
            (names.PREPARE_SHARDS_DONE, Gauge),
            (names.PREPARE_SHARDS_TOTAL, Gauge),
        )
    }
    assert status.preparation_from_metrics(generate_latest(registry).decode(), NOW) is None
    for source, (documents, tokens, done, total) in {
        "en-web": (100, 6400, 2, 4), "zh-web": (50, 3200, 1, 3),
    }.items():  # fmt: skip
        metrics[names.PREPARE_DOCUMENTS].labels("test", source).inc(documents)
        metrics[names.PREPARE_TOKENS].labels("test", source).inc(tokens)
        metrics[names.PREPARE_READ_BYTES].labels("test", source).inc(10**6)
        metrics[names.PREPARE_SHARDS_DONE].labels("test", source).set(done)
        metrics[names.PREPARE_SHARDS_TOTAL].labels("test", source).set(total)
    progress = status.preparation_from_metrics(generate_latest(registry).decode(), NOW)
    assert progress is not None
    summed = {"shardsDone": 3, "shardsTotal": 7, "tokens": 9600, "documents": 150}
    assert progress.model_dump(by_alias=True) == summed | {"updatedAt": NOW}

    # Kept through later passes, and complete once the Job is: its last shards came after the
    # last read.
    preparing = status.run_status(
        stored_run(), "test-abc", None, preparing=batch_job(), preparation=progress, now=NOW
    )
    assert preparing["preparation"]["shardsDone"] == 3
    later = status.run_status(stored_run(**preparing), "test-abc", None, preparing=batch_job(),
                              now=NOW)  # fmt: skip
    assert later["preparation"] == preparing["preparation"]
    done = status.prepared(later, "2026-11-22T12:05:00Z")
    assert done is not None and (done.shards_done, done.tokens) == (7, 9600)
    assert status.prepared({}, NOW) is None


def test_a_refused_job_is_said_once_and_keeps_the_restarts() -> None:
    said = "this cluster serves no TrainJobs (/apis/trainer.kubeflow.org/v1alpha1): install ..."
    run = stored_run(phase="Restarting", restarts=1)
    new = status.job_refused(run, "test-abc", "JobKindNotServed", said, NOW)
    assert (new["phase"], new["restarts"], new["jobName"]) == ("Pending", 1, "test-abc")
    (condition,) = new["conditions"]
    assert (condition["type"], condition["status"]) == ("JobCreated", "False")
    assert (condition["reason"], condition["message"]) == ("JobKindNotServed", said)
    # Retried until the CRD is installed: the same status, so no write and no second Event.
    later = "2027-01-01T00:00:00Z"
    assert status.job_refused({**run, "status": new}, "test-abc", "JobKindNotServed", said,
                              later) == new  # fmt: skip
    # After a spec change it names the new job.
    assert status.job_refused({**run, "status": new}, "test-new", "JobKindNotServed", said,
                              later)["jobName"] == "test-new"  # fmt: skip
