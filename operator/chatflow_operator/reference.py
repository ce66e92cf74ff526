"""docs/reference.md: every ChatFlowRun field, written from the CRD schema (itself from the models).

    python -m chatflow_operator.reference > docs/reference.md

tests/test_crd.py fails when the committed page differs from this output.
"""

from __future__ import annotations

import json
from typing import Any

from chatflow_operator.crd import schema


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (any)"
    kind = node.get("type", "")
    if kind == "array":
        return f"list of {_type(node['items'])}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type(node['additionalProperties'])}"
    return kind


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "minimum" in node:
        parts.append((">" if node.get("exclusiveMinimum") else "≥") + f" {node['minimum']}")
    if "maximum" in node:
        parts.append(f"≤ {node['maximum']}")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    for key, words in (("minLength", "length ≥"), ("maxLength", "length ≤")):
        if key in node:
            parts.append(f"{words} {node[key]}")
    for key, words in (("minItems", "items ≥"), ("maxItems", "items ≤")):
        if key in node:
            parts.append(f"{words} {node[key]}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(node: dict[str, Any], path: str, required: bool) -> list[str]:
    default = f"`{json.dumps(node['default'])}`" if "default" in node else ""
    rows = [
        f"| `{path}` | {_type(node)} | {'yes' if required else ''} | {default} | "
        f"{_cell(node.get('description', ''))} | {_cell(_constraints(node))} |"
    ]
    inner = node.get("items", node) if node.get("type") == "array" else node
    suffix = "[]" if inner is not node else ""
    for name, child in inner.get("properties", {}).items():
        rows += _rows(child, f"{path}{suffix}.{name}", name in inner.get("required", []))
    return rows


def reference() -> str:
    root = schema()
    lines = [
        "# ChatFlowRun reference",
        "",
        "Generated from `trainer_image/chatflow/spec.py` by "
        "`python -m chatflow_operator.reference`; do not edit.",
        "",
        f"{root['description']} `kubectl explain chatflowrun.spec` shows the same descriptions.",
        "",
        "| field | type | required | default | description | constraints |",
        "|---|---|---|---|---|---|",
    ]
    for section in ("spec", "status"):
        lines += _rows(root["properties"][section], section, section == "spec")
    lines += [
        "",
        "## Cross-field rules",
        "",
        "Checked by the API server (CEL) and the trainer alike.",
        "",
    ]
    for path, node in _with_rules(root["properties"]["spec"], "spec"):
        for rule in node["x-kubernetes-validations"]:
            field = f"{path}{rule.get('fieldPath', '')}"
            lines.append(f"- `{field}`: {rule['message']}")
    return "\n".join(lines) + "\n"


def _with_rules(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)] if "x-kubernetes-validations" in node else []
    inner = node.get("items", node) if node.get("type") == "array" else node
    suffix = "[]" if inner is not node else ""
    if inner is not node and "x-kubernetes-validations" in inner:
        found.append((f"{path}[]", inner))
    for name, child in inner.get("properties", {}).items():
        found += _with_rules(child, f"{path}{suffix}.{name}")
    return found


if __name__ == "__main__":
    print(reference(), end="")
