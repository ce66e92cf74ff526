"""`chatflow report --history`: the run's picture from the trainer's own history.jsonl.

The history here is written as train/loop.py writes it, with the schedule's targets and the
sampler's real draws. The Prometheus path runs against a real Prometheus in test_monitoring.py,
which also reports from a real trainer's history.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chatflow import report
from chatflow.cli import main as chatflow
from chatflow.sampler import MixtureSampler, Position
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRun, SpecError
from cluster import free_port
from factories import run_document

BATCH = 8


def write_history(path: Path, steps: range, eval_every: int = 5, loss_offset: float = 0) -> None:
    """Append the step and eval records of `steps` to `path`, as the trainer's rank 0 does."""
    spec = ChatFlowRun.model_validate(run_document()).spec
    schedule = Schedule.from_spec(spec)
    sampler = MixtureSampler(schedule, seed=0)
    names = spec.source_names
    position = sampler.advance(Position.start(len(names)), (steps.start - 1) * BATCH)
    with path.open("a") as f:
        for step in steps:
            before, position = position, sampler.advance(position, BATCH)
            drawn = np.subtract(position.cursors, before.cursors) / BATCH
            target = schedule.weights_at(schedule.progress(position.next_sample))
            record = {
                "time": 1_800_000_000.0 + step,
                "event": "step",
                "step": step,
                "samples": position.next_sample,
                "loss": 10 / step + loss_offset,
                "lr": 1e-3,
                "tokens_per_second": 1000.0,
                "target": dict(zip(names, target.round(6).tolist(), strict=True)),
                "realised": dict(zip(names, drawn.round(6).tolist(), strict=True)),
            }
            f.write(json.dumps(record) + "\n")
            if step % eval_every == 0:
                losses = {name: round(5 - step / 100 + k, 4) for k, name in enumerate(names)}
                f.write(json.dumps({"time": record["time"], "event": "eval", "step": step,
                                    "loss": losses}) + "\n")  # fmt: skip


def test_the_report_draws_every_panel(tmp_path: Path) -> None:
    history = tmp_path / "runs" / "test" / "history.jsonl"
    history.parent.mkdir(parents=True)
    write_history(history, range(1, 61))
    png = tmp_path / "report.png"
    assert chatflow(["report", "--history", str(history), "-o", str(png)]) == 0

    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    summary = json.loads(png.with_suffix(".json").read_text())
    names = ["en-web", "zh-web", "zh-en", "sft"]
    assert summary["run"] == "test"  # the output directory's name: runs/<run>
    assert [p["title"] for p in summary["panels"]] == list(report.PANELS)
    mixture, held_out, loss, throughput = summary["panels"]
    assert mixture["planned"] == mixture["realised"] == names
    assert held_out["sources"] == names
    assert loss["points"] == throughput["points"] == 60


def test_a_resumed_run_counts_the_steps_it_redid(tmp_path: Path) -> None:
    """Preempted after step 40, resumed from the checkpoint of step 30: 31-40 are logged twice,
    and the second time is the one that trained the model."""
    history = tmp_path / "history.jsonl"
    write_history(history, range(1, 41), loss_offset=100)
    write_history(history, range(31, 61))
    data = report.from_history(history)
    assert data.loss is not None
    assert list(data.loss.x) == [step * BATCH for step in range(1, 61)]
    assert data.loss.y[34] == pytest.approx(10 / 35)  # step 35, from the resumed run
    assert list(data.held_out["sft"].x) == [step * BATCH for step in range(5, 61, 5)]


def test_the_realised_mixture_follows_the_plan(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    write_history(history, range(1, 501))
    data = report.from_history(history)
    # Pooled over 10 steps (80 samples) the sampler's draws stay close to the moving target.
    for name, planned in data.planned.items():
        realised = data.realised[name]
        assert np.abs(realised.y[20:] - planned.y[20:]).max() < 0.06, name


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--history", "missing.jsonl"], 2, "--history: cannot read missing.jsonl"),
        (["--prometheus", "http://127.0.0.1:9"], 2, "--run: required with --prometheus"),
        (["--prometheus", "URL", "--run", "r", "--start", "May"], 2, "--start: 'May' is not"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    args: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert chatflow(["report", *args]) == status
    assert message in capsys.readouterr().err


def test_an_unreachable_prometheus_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert chatflow(["report", "--prometheus", url, "--run", "tiny"]) == 1
    assert f"chatflow: error: --prometheus: {url}:" in capsys.readouterr().err


def test_times_are_unix_seconds_or_rfc3339() -> None:
    assert report.parse_time("1800000000", "--end") == 1_800_000_000
    assert report.parse_time("2027-01-15T08:00:00Z", "--end") == 1_800_000_000
    with pytest.raises(SpecError, match="--end: 'yesterday' is not Unix seconds"):
        report.parse_time("yesterday", "--end")
