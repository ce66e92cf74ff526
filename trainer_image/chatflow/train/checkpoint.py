"""Checkpoints: written atomically, found by step, pruned to the newest K.

    <output>/checkpoints/step-00000050/   complete checkpoints (DeepSpeed shards + trainer.json)
    <output>/checkpoints/.incomplete/     where a checkpoint is written before its rename

Every rank writes its DeepSpeed shards under `.incomplete/step-N`; after a barrier, rank 0 adds
`trainer.json` (the `TrainerState`) and renames the directory into place. A checkpoint cut short by
SIGKILL is therefore never chosen: it is still under `.incomplete/`, which the next start clears.
Ranks must share the output directory (a PVC on a cluster).

No RNG state is saved: the loop reseeds torch from the step, and the data order is a function of
the sampler position.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatflow.sampler import Position

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer.json"


@dataclass(frozen=True)
class TrainerState:
    """What a checkpoint holds besides DeepSpeed's shards: all the loop needs to continue.

    Version 1 files from before the field existed have no `version`; a later version that this
    trainer cannot read is refused rather than misread.
    """

    VERSION = 1

    step: int  # optimizer steps done
    world_size: int  # processes that saved it (another number loads it through universal format)
    position: Position  # the sampler's: the next global sample and each source's cursor
    tokens: tuple[int, ...]  # tokens trained on per source, in the spec's source order
    # DeepSpeed loads a checkpoint only in the precision that saved it (None: saved before this
    # field existed)
    precision: str | None

    def to_json(self, sources: tuple[str, ...]) -> str:
        return json.dumps(
            {
                "version": self.VERSION,
                "step": self.step,
                "world_size": self.world_size,
                "position": self.position.to_dict(sources),
                "tokens": dict(zip(sources, self.tokens, strict=True)),
                "precision": self.precision,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, sources: tuple[str, ...]) -> TrainerState:
        """Sources added to the spec since the save start at zero."""
        state = json.loads(text)
        if state.get("version", 1) > cls.VERSION:
            raise ValueError(
                f"{STATE_FILE} has version {state['version']}; this trainer reads {cls.VERSION}"
            )
        return cls(
            step=state["step"],
            world_size=state["world_size"],
            position=Position.from_dict(state["position"], sources),
            tokens=tuple(int(state["tokens"].get(s, 0)) for s in sources),
            precision=state.get("precision"),
        )


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

    def publish(self, state: TrainerState, sources: tuple[str, ...], keep: int) -> Path:
        """Add the trainer state to the staged checkpoint, rename it into place, prune old ones."""
        staged = self.staging / self.tag(state.step)
        (staged / STATE_FILE).write_text(state.to_json(sources))
        final = self.root / self.tag(state.step)
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a restart
        os.replace(staged, final)
        for _, old in self.complete()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def state(checkpoint: Path, sources: tuple[str, ...]) -> TrainerState:
        return TrainerState.from_json((checkpoint / STATE_FILE).read_text(), sources)


def save(
    engine: Any,
    checkpoints: Checkpoints,
    state: TrainerState,
    sources: tuple[str, ...],
    keep: int,
    is_main: bool,
) -> float:
    """Save a checkpoint of `state.step` from every rank; the seconds it took."""
    from chatflow.train import distributed

    started = time.perf_counter()
    tag = Checkpoints.tag(state.step)
    engine.save_checkpoint(str(checkpoints.staging), tag=tag, save_latest=False)
    distributed.barrier()
    if is_main:
        checkpoints.publish(state, sources, keep)
    distributed.barrier()
    return time.perf_counter() - started


def load(
    engine: Any, checkpoint: Path, state: TrainerState, world_size: int, is_main: bool
) -> None:
    """Load `checkpoint` into the engine, on any number of processes.

    A checkpoint saved by another world size is first converted to DeepSpeed's universal format,
    which `engine` must have been configured to load (`checkpoint.load_universal`).
    """
    if state.world_size == world_size:
        engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        return
    from chatflow.train import distributed

    target = checkpoint.parent / ".universal"
    if is_main:
        shutil.rmtree(target, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
        command += [
            "--input_folder",
            str(checkpoint),
            "--output_folder",
            str(target / checkpoint.name),
        ]
        subprocess.run([*command, "--inject_missing_state"], check=True, capture_output=True)
    distributed.barrier()
    engine.load_checkpoint(str(target), tag=checkpoint.name)
