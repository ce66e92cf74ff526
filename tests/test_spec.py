"""The ChatFlowRun spec: valid manifests parse, bad ones fail with one line naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from chatflow.spec import SpecError, load_run, parse_run
from factories import BAD_INPUTS, BAD_SCHEDULES, changed, run_document


def test_valid_document_parses_with_defaults() -> None:
    run = parse_run(run_document())
    assert run.spec.source_names == ("en-web", "zh-web", "zh-en", "sft")
    assert run.spec.schedule.unit == "samples"
    assert run.spec.data.sources[2].template == "{source}\n{target}"
    assert run.spec.data.sources[2].language_label == "zh-en"
    assert run.spec.training.seed == 0


def test_total_samples_is_the_earliest_stop() -> None:
    training = {"seqLength": 100, "globalBatchSize": 4, "maxTokens": 1050, "maxSteps": 5}
    assert parse_run(run_document(training=training)).spec.training.total_samples == 11
    training["maxSamples"] = 7
    spec = parse_run(run_document(training=training)).spec.training
    assert (spec.total_samples, spec.total_steps) == (7, 1)


@pytest.mark.parametrize(("path", "value", "expected"), BAD_INPUTS, ids=lambda p: str(p)[:40])
def test_bad_input_is_one_line_naming_the_field(path: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_run(changed(run_document(), path, value))
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(expected), message


@pytest.mark.parametrize(("schedule", "expected"), BAD_SCHEDULES, ids=lambda p: str(p)[:40])
def test_schedule_entry_errors_name_the_entry(schedule: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_run(run_document(schedule=schedule))
    assert str(error.value).startswith(expected), error.value


def test_manifest_file_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_run(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line 2"):
        load_run(broken)
    broken.write_text("- a list\n")
    with pytest.raises(SpecError, match="expected a ChatFlowRun mapping"):
        load_run(broken)
