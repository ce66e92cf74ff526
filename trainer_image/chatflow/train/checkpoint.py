"""Checkpoints: written atomically, found by step, pruned to the newest K.

    <output>/checkpoints/step-00000050/   complete checkpoints (DeepSpeed shards + trainer.json)
    <output>/checkpoints/.incomplete/     where a checkpoint is written before its rename

Every rank writes its DeepSpeed shards under `.incomplete/step-N`; after a barrier, rank 0 adds
`trainer.json` (sampler position, tallies, precision, RNG seeds) and renames the directory into
place. A checkpoint cut short by SIGKILL is therefore never chosen: it is still under
`.incomplete/`, which the next start clears. Ranks must share the output directory (a PVC on a
cluster).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer.json"


@dataclass(frozen=True)
class Checkpoints:
    root: Path

    @property
    def staging(self) -> Path:
        return self.root / ".incomplete"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        complete = self.complete()
        return complete[-1] if complete else None

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    def prepare(self) -> None:
        """Make the directories, clear what an interrupted save left (rank 0, before training)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        probe = self.staging / ".writable"
        probe.write_text("")  # fail now, not at the first save hours later
        probe.unlink()

    def publish(self, step: int, state: dict[str, Any], keep: int) -> Path:
        """Add the trainer state to the staged checkpoint, rename it into place, prune old ones."""
        staged = self.staging / self.tag(step)
        (staged / STATE_FILE).write_text(json.dumps(state, indent=2))
        final = self.root / self.tag(step)
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a restart
        os.replace(staged, final)
        for _, old in self.complete()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def state(checkpoint: Path) -> dict[str, Any]:
        return json.loads((checkpoint / STATE_FILE).read_text())
