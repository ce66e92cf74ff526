"""The run's status from its PyTorchJob and its trainer's metrics (pure functions, no cluster)."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from chatflow.spec import parse_run
from chatflow.train.metrics import TrainerMetrics
from chatflow_operator import status
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
    assert status.job_phase(None) == "Pending"
    assert status.job_phase(job(created)) == "Pending"
    assert status.job_phase(job(created, running)) == "Running"
    restarting = condition("Restarting", "2026-01-01T00:01:00Z")
    stale_running = condition("Running", "2026-01-01T00:00:05Z", "False")
    assert status.job_phase(job(created, stale_running, restarting)) == "Restarting"
    # Set in the same second, the terminal condition wins.
    succeeded = condition("Succeeded", "2026-01-01T00:00:05Z")
    assert status.job_phase(job(created, running, succeeded)) == "Succeeded"
    failed = condition("Failed", "2026-01-01T00:09:00Z")
    assert status.job_phase(job(created, running, failed)) == "Failed"
    suspended = condition("Suspended", "2026-01-01T00:09:00Z")
    assert status.job_phase(job(created, stale_running, suspended)) == "Suspended"


def test_status_mirrors_the_job_with_observed_generation() -> None:
    the_job = job(
        condition("Created", "2026-01-01T00:00:00Z"),
        condition("Running", "2026-01-01T00:00:05Z"),
        startTime="2026-01-01T00:00:05Z",
    )
    new = status.run_status(stored_run(), "test-abc", the_job, restarts=1, now=NOW)
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

    failed = job(condition("Running", NOW, "False"), condition("Failed", NOW))
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
