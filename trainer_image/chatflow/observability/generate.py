"""`python -m chatflow.observability`: write the dashboard and the rules where they ship.

The files are committed (kustomize and Helm read them, people read their diffs); the tests fail
when one differs from what this writes, so they never drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from chatflow.observability.dashboard import dashboard_json
from chatflow.observability.rules import prometheus_rule, rules_file

# Paths from the repository's root, and what each holds.
OUTPUTS: dict[str, Callable[[], str]] = {
    "manifests/monitoring/grafana-dashboard.json": dashboard_json,
    "manifests/monitoring/prometheus-rules.yaml": prometheus_rule,
    "manifests/monitoring/rules.yaml": rules_file,
    # The operator's Helm chart templates these two with .Files.Get.
    "charts/chatflow-operator/files/grafana-dashboard.json": dashboard_json,
    "charts/chatflow-operator/files/prometheus-rules.yaml": rules_file,
}


def generated() -> dict[str, str]:
    """Each output path and the text it should hold."""
    texts = {render: render() for render in set(OUTPUTS.values())}
    return {path: texts[render] for path, render in OUTPUTS.items()}


def stale(root: Path) -> list[str]:
    """The outputs under `root` that are missing or differ from what would be written."""
    return [
        path
        for path, text in generated().items()
        if not (root / path).exists() or (root / path).read_text() != text
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatflow.observability", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(), help="the repository (default: .)")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is out of date"
    )
    args = parser.parse_args(argv)
    if not (args.root / "manifests").is_dir():
        parser.error(f"{args.root.resolve()} is not the repository's root (no manifests/)")
    if args.check:
        out_of_date = stale(args.root)
        for path in out_of_date:
            print(f"out of date: {path} (run python -m chatflow.observability)", file=sys.stderr)
        return 1 if out_of_date else 0
    for path, text in generated().items():
        target = args.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {path}")
    return 0
