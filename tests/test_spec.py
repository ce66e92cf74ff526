"""The ChatFlowRun spec: valid manifests parse, bad ones fail with one line naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from chatflow.spec import SpecError, load_run, parse_run
from factories import run_document


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


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set (or with value ... delete) a dotted path such as spec.data.sources.0.path."""
    *parents, last = path.split(".")
    node = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key = int(last) if last.isdigit() else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return document


BAD_INPUTS = [
    ("spec.data.sources.0.path", ..., "spec.data.sources[0].path: required field is missing"),
    ("spec.data.sources.0.path", "", "spec.data.sources[0].path: String should have at least"),
    ("spec.data.sources.1.name", "en-web", "spec.data.sources[1].name: duplicate source name"),
    ("spec.data.sources.1.name", "Zh_Web", "spec.data.sources[1].name: String should match"),
    ("spec.data.sources.0.kind", "pretraining", "spec.data.sources[0].kind: got 'pretraining'"),
    ("spec.data.sources.0.language", ..., "spec.data.sources[0].language: required for kind"),
    ("spec.data.sources.2.fields", ..., "spec.data.sources[2].fields: required for kind parallel"),
    ("spec.data.sources.2.template", "{source}", "spec.data.sources[2].template: must contain"),
    ("spec.data.sources.2.template", "{src} {target}", "spec.data.sources[2].template: unknown"),
    ("spec.data.sources.3.format", "sharegpt", "spec.data.sources[3].format: got 'sharegpt'"),
    ("spec.data.sources.0.format", "alpaca", "spec.data.sources[0].format: only allowed for"),
    ("spec.data.sources.0.maxEpochs", 0, "spec.data.sources[0].maxEpochs: Input should be greater"),
    ("spec.data.sources.0.textFeild", "t", "spec.data.sources[0].textFeild: unknown field"),
    ("spec.data.sources", [], "spec.data.sources: List should have at least 1 item"),
    ("spec.schedule.start.wiki", 0.5, "spec.schedule.start.wiki: unknown source 'wiki'"),
    ("spec.schedule.end.sft", -0.1, "spec.schedule.end.sft: Input should be greater than or equal"),
    ("spec.schedule.end", {"sft": 0, "en-web": 0}, "spec.schedule.end: needs at least one"),
    ("spec.schedule.growth", 0, "spec.schedule.growth: Input should be greater than 0"),
    ("spec.schedule.growth", ..., "spec.schedule.growth: required for curve linear"),
    ("spec.schedule.curve", "stages", "spec.schedule.stages: required for curve stages"),
    ("spec.schedule.unit", "steps", "spec.schedule.unit: got 'steps'"),
    ("spec.training.maxSamples", ..., "spec.training.maxSamples: set at least one of"),
    ("spec.training.seqLength", 4, "spec.training.seqLength: Input should be greater than or"),
    ("spec.training.maxSamples", 4, "spec.training.maxSamples: the run is shorter than one"),
    ("spec.training.microBatchSize", 3, "spec.training.globalBatchSize: must be a multiple of"),
    ("spec.training.zeroStage", 4, "spec.training.zeroStage: got 4"),
    ("spec.training.optimizer", {"lr": 0}, "spec.training.optimizer.lr: Input should be greater"),
    ("spec.model", ..., "spec.model: required field is missing"),
    ("spec.nodes", 0, "spec.nodes: Input should be greater than or equal to 1"),
    ("spec.gpusPerNode", -1, "spec.gpusPerNode: Input should be greater than or equal to 0"),
    ("spec.suspend", "maybe", "spec.suspend: Input should be a valid boolean"),
    ("spec.resources", {"limits": {"nvidia.com/gpu": 8}}, "spec.resources.limits: set gpusPerNode"),
    ("spec.storage", {"claimName": "ckpt", "mountPath": "data"}, "spec.storage.mountPath: String"),
    ("spec.storage", {"mountPath": "/data"}, "spec.storage.claimName: required field is missing"),
    ("spec.env", [{"name": "HF_TOKEN"}], "spec.env[0]: set value or valueFrom"),
    ("spec.env", [{"name": "HF-TOKEN", "value": "x"}], "spec.env[0].name: String should match"),
    (
        "spec.scheduling",
        {"tolerations": [{"operator": "Exists", "value": "x"}]},
        "spec.scheduling.tolerations[0].value: not allowed with Exists",
    ),
    ("spec.runPolicy", {"backoffLimit": -1}, "spec.runPolicy.backoffLimit: Input should be"),
    ("metadata.name", "r" * 46, "metadata.name: String should have at most 45 characters"),
    ("kind", "PyTorchJob", "kind: got 'PyTorchJob'"),
    ("apiVersion", "chatflow.io/v1", "apiVersion: got 'chatflow.io/v1'"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_INPUTS, ids=lambda p: str(p)[:40])
def test_bad_input_is_one_line_naming_the_field(path: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_run(_set(run_document(), path, value))
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(expected), message


def test_stage_and_point_ordering_errors_name_the_entry() -> None:
    stages = {
        "curve": "stages",
        "stages": [
            {"until": 100, "weights": {"en-web": 1}},
            {"until": 50, "weights": {"sft": 1}},
            {"weights": {"sft": 1}},
        ],
    }
    with pytest.raises(SpecError, match=r"^spec\.schedule\.stages\[1\]\.until: must be greater"):
        parse_run(run_document(schedule=stages))
    points = {
        "curve": "points",
        "points": [{"at": 5, "weights": {"sft": 1}}, {"at": 5, "weights": {"sft": 1}}],
    }
    with pytest.raises(SpecError, match=r"^spec\.schedule\.points\[1\]\.at: must be greater"):
        parse_run(run_document(schedule=points))


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
