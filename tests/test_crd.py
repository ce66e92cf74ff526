"""The CRD is generated from the spec models; the committed copy must match."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from chatflow_operator.backends.trainjob import runtime_yaml
from chatflow_operator.crd import crd, crd_yaml, schema
from chatflow_operator.reference import reference

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "manifests" / "base" / "crd.yaml"


def test_committed_crd_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == crd_yaml(), (
        "manifests/base/crd.yaml is stale: run `chatflow-operator crd > manifests/base/crd.yaml`"
    )


def test_committed_trainjob_runtime_is_the_generated_one() -> None:
    committed = REPO / "manifests" / "trainjob" / "clustertrainingruntime.yaml"
    assert committed.read_text() == runtime_yaml(), (
        "manifests/trainjob/clustertrainingruntime.yaml is stale: run `make generate`"
    )


def _nodes(node: object):
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key not in ("default", "enum"):
                yield from _nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _nodes(item)


def test_schema_is_structural() -> None:
    """No JSON Schema constructs the API server refuses; every object declares its fields."""
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "prefixItems", "title"}
    root = schema()
    root["properties"].pop("metadata")  # the API server's own ObjectMeta schema applies
    for node in _nodes(root):
        assert not forbidden & node.keys(), json.dumps(node)[:200]
        if node.get("type") == "object" and "properties" not in node:
            assert "additionalProperties" in node or node.get(
                "x-kubernetes-preserve-unknown-fields"
            ), json.dumps(node)[:200]


def test_schema_carries_defaults_enums_descriptions_and_cel() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    training = spec["training"]["properties"]
    assert training["seqLength"]["default"] == 2048
    assert training["zeroStage"]["enum"] == [0, 1, 2, 3]
    assert training["globalBatchSize"] == {
        "default": 512,
        "description": "samples per optimizer step",
        "minimum": 0,
        "exclusiveMinimum": True,
        "type": "integer",
    }
    assert training["optimizer"]["default"] == {}  # nested defaults fill in from each field
    quantity = spec["resources"]["properties"]["limits"]["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True
    sources = spec["data"]["properties"]["sources"]
    assert sources["x-kubernetes-list-map-keys"] == ["name"]
    rules = [v["rule"] for v in sources["items"]["x-kubernetes-validations"]]
    assert "self.kind != 'parallel' || has(self.fields)" in rules
    phases = schema()["properties"]["status"]["properties"]["phase"]["enum"]
    assert phases[:2] == ["Preparing", "Pending"]


def test_crd_metadata() -> None:
    document = crd()
    version = document["spec"]["versions"][0]
    assert document["metadata"]["name"] == "chatflowruns.chatflow.io"
    assert document["spec"]["names"]["shortNames"] == ["cfr"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:2] == ["Phase", "Progress"] and "Nodes" in columns and columns[-1] == "Age"
    assert yaml.safe_load(crd_yaml()) == document


def test_committed_reference_is_the_generated_one() -> None:
    committed = (REPO / "docs" / "reference.md").read_text()
    assert committed == reference(), (
        "docs/reference.md is stale: "
        "run `python -m chatflow_operator.reference > docs/reference.md`"
    )
