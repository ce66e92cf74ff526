"""Small valid ChatFlowRun documents for tests to start from and break."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SOURCES = [
    {"name": "en-web", "kind": "pretrain", "language": "en", "path": "data/en.jsonl"},
    {"name": "zh-web", "kind": "pretrain", "language": "zh", "path": "data/zh.jsonl"},
    {
        "name": "zh-en",
        "kind": "parallel",
        "languages": ["zh", "en"],
        "fields": {"source": "zh", "target": "en"},
        "path": "data/zh-en.jsonl",
    },
    {"name": "sft", "kind": "instruction", "format": "alpaca", "path": "data/sft.jsonl"},
]


def run_document(**spec: Any) -> dict[str, Any]:
    """A valid manifest; keyword arguments replace top-level spec sections."""
    document = {
        "apiVersion": "chatflow.io/v1alpha1",
        "kind": "ChatFlowRun",
        "metadata": {"name": "test"},
        "spec": {
            "model": {"base": "model"},
            "data": {"sources": copy.deepcopy(SOURCES)},
            "schedule": {
                "curve": "linear",
                "growth": 1000,
                "start": {"en-web": 0.5, "zh-web": 0.2, "zh-en": 0.3, "sft": 0.0},
                "end": {"en-web": 0.1, "zh-web": 0.3, "zh-en": 0.1, "sft": 0.5},
            },
            "training": {"seqLength": 64, "globalBatchSize": 8, "maxSamples": 2000},
        },
    }
    document["spec"].update(copy.deepcopy(spec))
    return document


def tiny_manifest(
    tiny_example: Path, dest: Path, *, max_epochs: float | None = None, **spec: Any
) -> Path:
    """The tiny example with absolute paths (so it can live anywhere), `spec` sections merged in.

    `max_epochs`: raise the maxEpochs the example sets to this, for runs long enough to repeat the
    small instruction sets past them (which preparation refuses before training starts).
    """
    document = yaml.safe_load(tiny_example.read_text())
    for section, values in spec.items():
        document["spec"][section] |= values
    base = tiny_example.parent
    for source in document["spec"]["data"]["sources"]:
        if max_epochs is not None and "maxEpochs" in source:
            source["maxEpochs"] = max_epochs
        if (base / source["path"]).exists():  # not hub ids
            source["path"] = str(base / source["path"])
    model = document["spec"]["model"]
    model["base"], model["tokenizer"] = str(base / model["base"]), str(base / model["tokenizer"])
    model["extendVocab"]["tokensFile"] = str(base / model["extendVocab"]["tokensFile"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(document, allow_unicode=True))
    return dest


def changed(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
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
    ("spec.backend", "trainjob", "spec.storage: required with backend trainjob"),
    ("spec.backend", "tfjob", "spec.backend: got 'tfjob'"),
    ("metadata.name", "r" * 46, "metadata.name: String should have at most 45 characters"),
    ("kind", "PyTorchJob", "kind: got 'PyTorchJob'"),
    ("apiVersion", "chatflow.io/v1", "apiVersion: got 'chatflow.io/v1'"),
]


# Schedules whose entries break the ordering and naming rules.
SFT = {"sft": 1}
BAD_SCHEDULES = [
    (
        {"curve": "stages", "stages": [{"until": 9, "weights": SFT}, {"until": 5, "weights": SFT}]},
        "spec.schedule.stages[1].until: must be greater",
    ),
    (
        {"curve": "stages", "stages": [{"weights": SFT}, {"until": 5, "weights": SFT}]},
        "spec.schedule.stages[0].until: required on every stage but the last",
    ),
    (
        {"curve": "points", "points": [{"at": 5, "weights": SFT}, {"at": 5, "weights": SFT}]},
        "spec.schedule.points[1].at: must be greater",
    ),
    (
        {"curve": "points", "points": [{"at": 0, "weights": {"sft": 0}}]},
        "spec.schedule.points[0].weights: needs at least one positive weight",
    ),
    (
        {"curve": "points", "points": [{"at": 0, "weights": {"wiki": 1}}]},
        "spec.schedule.points[0].weights.wiki: unknown source",
    ),
]  # fmt: skip
