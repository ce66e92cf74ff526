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


def tiny_manifest(tiny_example: Path, dest: Path, **spec: Any) -> Path:
    """The tiny example with absolute paths (so it can live anywhere), `spec` sections merged in."""
    document = yaml.safe_load(tiny_example.read_text())
    for section, values in spec.items():
        document["spec"][section] |= values
    base = tiny_example.parent
    for source in document["spec"]["data"]["sources"]:
        if (base / source["path"]).exists():  # not hub ids
            source["path"] = str(base / source["path"])
    model = document["spec"]["model"]
    model["base"], model["tokenizer"] = str(base / model["base"]), str(base / model["tokenizer"])
    model["extendVocab"]["tokensFile"] = str(base / model["extendVocab"]["tokensFile"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(document, allow_unicode=True))
    return dest
