"""What a training run records in its output directory for later reading.

    <output>/history.jsonl           rank 0's step, eval and precision records (`chatflow report`)
    <output>/samples/rank-<r>.jsonl  every global sample index rank r trained on (`--log-samples`)

Both are appended to across restarts, one JSON object per line, so a resumed run records again
the steps after its last checkpoint; readers take the later record of a step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatflow.spec import SpecError

HISTORY_FILE = "history.jsonl"


class History:
    """Rank 0's records of the run, appended to `history.jsonl` (other ranks write nothing)."""

    def __init__(self, output: Path, enabled: bool) -> None:
        self.path = output / HISTORY_FILE if enabled else None

    def write(self, event: str, **record: Any) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": time.time(), "event": event, **record}) + "\n")


@dataclass
class Recorded:
    """A history read back: step records and held-out losses (source -> loss), by step."""

    steps: dict[int, dict[str, Any]]
    evals: dict[int, dict[str, float]]


def read(path: Path) -> Recorded:
    """Read `history.jsonl`; a step recorded twice (a resumed run) counts by its later record."""
    recorded = Recorded({}, {})
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SpecError(f"--history: cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise SpecError(f"--history: {path}:{number}: not a JSON record") from None
        if record.get("event") == "step":
            recorded.steps[record["step"]] = record
        elif record.get("event") == "eval":
            recorded.evals[record["step"]] = record["loss"]
    return recorded


class SampleLog:
    """Every global sample index this rank trained on, per step (`--log-samples`, for audits)."""

    def __init__(self, output: Path, rank: int) -> None:
        directory = output / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rank-{rank}.jsonl"

    def write(self, step: int, indices: list[int]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "indices": indices}) + "\n")
