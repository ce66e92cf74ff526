"""The ChatFlowRun CustomResourceDefinition, generated from the pydantic models in chatflow.spec.

Pydantic writes JSON Schema; Kubernetes wants a structural OpenAPI v3 schema: no `$ref`, no
`anyOf` for optional fields, no `const` or `prefixItems`, OpenAPI 3.0's boolean exclusive bounds,
and `x-kubernetes-*` markers instead of free-form objects. `structural` does that translation;
everything else (types, bounds, enums, defaults, descriptions, CEL rules) comes from the models.

`manifests/base/crd.yaml` is this module's output; tests/test_crd.py fails when they differ. So is
the Helm chart's `templates/crd.yaml` (`crd_helm_template`), checked by tests/test_helm.py.
"""

from __future__ import annotations

import copy
import textwrap
from typing import Any

import yaml

from chatflow.spec import API_GROUP, KIND, ChatFlowRun

PLURAL = "chatflowruns"
VERSION = "v1alpha1"
SHORT_NAMES = ["cfr"]
PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Progress",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.progress.fraction",
        "description": "share of the run's samples trained on",
    },
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.nodes"},
    {"name": "GPUs/Node", "type": "integer", "jsonPath": ".spec.gpusPerNode"},
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
    {"name": "Schedule", "type": "string", "jsonPath": ".status.progress.schedulePhase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# JSON Schema keywords that have no place in a CRD schema.
DROPPED = {"title", "$defs"}


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """Translate one pydantic JSON Schema node (and everything below it) to structural OpenAPI."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:  # inline the definition; the referring field's keys win
        node = {**defs[node.pop("$ref").rsplit("/", 1)[-1]], **node}
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v != {"type": "null"}]
        if {v.get("type") for v in variants} == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
        else:
            (variant,) = variants  # `X | None`: optional means "may be absent"
            node = {**structural(variant, defs), **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "prefixItems" in node:  # a fixed-length tuple of one type
        items = node.pop("prefixItems")
        node |= {"items": items[0], "minItems": len(items), "maxItems": len(items)}
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[plain], node[bound] = node[bound], True
    if node.get("additionalProperties") is True:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # structural schemas prune unknown fields instead
    if node.get("default", ...) is None:
        del node["default"]
    elif isinstance(node.get("default"), dict) and node.get("type") == "object":
        # An empty object lets the API server fill in the nested defaults, each from its field.
        node["default"] = {}
    return {
        key: (value if key in ("default", "enum") else structural(value, defs))
        for key, value in node.items()
        if key not in DROPPED
    }


def schema() -> dict[str, Any]:
    """The openAPIV3Schema of a ChatFlowRun."""
    source = ChatFlowRun.model_json_schema(by_alias=True)
    defs = source.get("$defs", {})
    root = structural(source, defs)
    properties = root["properties"]
    # The API server owns these: apiVersion and kind are plain strings, metadata is ObjectMeta.
    properties["apiVersion"] = {"type": "string"}
    properties["kind"] = {"type": "string"}
    properties["metadata"] = {"type": "object"}
    root["required"] = ["spec"]
    root["description"] = (
        "A ChatFlow training run: continued multilingual training of a causal LM with a dynamic "
        "data mixture, run as a Kubeflow PyTorchJob."
    )
    return copy.deepcopy(root)  # no shared sub-dicts: YAML would write anchors for them


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": ["chatflow"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from chatflow/spec.py by `chatflow-operator crd`; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, allow_unicode=True, width=100)


HELM_HEADER = """\
{{- /* Generated from chatflow/spec.py by `chatflow-operator crd --helm`; do not edit.
A template, not in crds/: Helm installs crds/ once and never upgrades them, so a changed
schema would never reach the cluster. `keep`: `helm uninstall` leaves the CRD, whose deletion
would delete every ChatFlowRun with it. */ -}}
{{- if .Values.crds.install }}
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: %s
  labels:
    {{- include "chatflow-operator.labels" . | nindent 4 }}
  annotations:
    helm.sh/resource-policy: keep
spec:
"""


def crd_helm_template() -> str:
    """The CRD as the Helm chart's template (charts/chatflow-operator/templates/crd.yaml)."""
    document = crd()
    spec = yaml.safe_dump(document["spec"], sort_keys=False, allow_unicode=True, width=100)
    if "{{" in spec:  # Helm would read it as a template action
        raise ValueError("the CRD's spec contains '{{', which Helm would read as a template")
    body = textwrap.indent(spec, "  ")
    return HELM_HEADER % document["metadata"]["name"] + body + "{{- end }}\n"
