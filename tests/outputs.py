"""Readers of a training run's output directory (`--output`): history and sample logs."""

from __future__ import annotations

import json
from pathlib import Path


def losses(output: Path) -> dict[int, float]:
    """Loss per step from rank 0's history (a step redone after a crash: its last record)."""
    history = output / "history.jsonl"
    if not history.exists():
        return {}
    records = [json.loads(line) for line in history.read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in records if r["event"] == "step"}


def samples(output: Path) -> dict[int, list[int]]:
    """The global sample indices trained on at each step, over all ranks.

    A rank's step redone after a crash replaces its first try.
    """
    merged: dict[int, list[int]] = {}
    for path in sorted((output / "samples").glob("rank-*.jsonl")):
        steps = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]] = record["indices"]
        for step, indices in steps.items():
            merged.setdefault(step, []).extend(indices)
    return {step: sorted(indices) for step, indices in merged.items()}


def global_batches(steps: int, global_batch_size: int) -> dict[int, list[int]]:
    """What every run trains on: step s on the global samples of its batch, in order."""
    size = global_batch_size
    return {s: list(range(size * (s - 1), size * s)) for s in range(1, steps + 1)}
