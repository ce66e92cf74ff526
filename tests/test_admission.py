"""The API server rejects bad ChatFlowRuns at admission, naming the field, as the spec does.

Every bad manifest of the spec's own tests (tests/factories.py) that is a well-formed ChatFlowRun
goes to a real kube-apiserver with the generated CRD: its schema and CEL rules must reject it and
name the same field as the pydantic models (or, for a list entry, the entry).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from controlplane import ControlPlane
from factories import BAD_INPUTS, BAD_SCHEDULES, changed, run_document

pytestmark = pytest.mark.cluster


CASES = [
    (changed(run_document(), path, value), expected)
    for path, value, expected in BAD_INPUTS
    if expected.startswith(("spec.", "metadata."))  # apiVersion and kind select no CRD at all
] + [(run_document(schedule=schedule), expected) for schedule, expected in BAD_SCHEDULES]


def accepted_paths(field: str) -> list[str]:
    """The field, or a parent the API server may name instead: a CEL rule reports the object it
    sits on (`spec.schedule.points` for an entry's weights), a list-map its duplicate entry."""
    paths = [field]
    while (parent := re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", paths[-1])).count(".") >= 2:
        paths.append(parent)
    return paths


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 12


@pytest.mark.parametrize(("document", "expected"), CASES, ids=[c[1][:48] for c in CASES])
def test_rejected_at_admission_naming_the_field(
    cluster: ControlPlane, document: dict[str, Any], expected: str
) -> None:
    document["metadata"]["namespace"] = "default"
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(document), check=False
    )
    assert result.returncode != 0, f"accepted: {expected}"
    field = expected.split(":")[0]
    named = [
        path
        for path in accepted_paths(field)
        if f"{path}:" in result.stderr or f'unknown field "{path}"' in result.stderr
    ]
    assert named, f"{field} not named in: {result.stderr}"


def test_valid_runs_are_accepted(cluster: ControlPlane) -> None:
    document = run_document()
    document["metadata"]["namespace"] = "default"
    cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(document))
