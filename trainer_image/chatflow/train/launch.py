"""`chatflow train`: check the run on this machine, then start torchrun with one process per device.

Problems a user can fix (manifest, data, tokenizer, model, output directory, DeepSpeed options) are
found here, before any worker starts, so they are one line each rather than a failure in every
process.
Preparing the data here also means the workers find it cached.
"""

from __future__ import annotations

import os
from pathlib import Path

from chatflow.data.pipeline import load_model_config, load_tokenizer, prepare_sources
from chatflow.data.prepare import checkpoint_position
from chatflow.data.progress import Progress
from chatflow.spec import ChatFlowRun, SpecError, TrainingSpec
from chatflow.train import torchrun
from chatflow.train.checkpoint import Checkpoints
from chatflow.train.deepspeed_config import deepspeed_config, deepspeed_problem


def launch(
    manifest: Path,
    run: ChatFlowRun,
    output: Path,
    cache_dir: Path,
    processes: int,
    log_samples: bool = False,
) -> int:
    """Run the trainer under torchrun on this machine; return its exit status."""
    preflight(run, manifest.parent, output, cache_dir, processes)
    command = ["--standalone", f"--nproc-per-node={processes}", "-m", "chatflow.train"]
    command += ["--file", str(manifest), "--output", str(output), "--cache-dir", str(cache_dir)]
    if log_samples:
        command.append("--log-samples")
    env = dict(os.environ)
    # Each process gets its share of the cores (torchrun would otherwise pin every one to 1).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    # A stop request is passed on: torchrun hands it to the workers, which checkpoint and exit.
    return torchrun.run(command, env)


def preflight(
    run: ChatFlowRun, base_dir: Path, output: Path, cache_dir: Path, processes: int
) -> None:
    """Raise SpecError for anything the workers would fail on that the user can fix."""
    try:
        Checkpoints(output / "checkpoints").prepare()
    except OSError as e:
        raise SpecError(f"--output: cannot write to {output}: {e.strerror}") from None
    tokenizer, _ = load_tokenizer(run.spec, base_dir)
    load_model_config(run.spec, base_dir)
    progress = Progress(run.metadata.name)
    position = checkpoint_position(run.spec, output)
    prepare_sources(run.spec, base_dir, cache_dir, tokenizer, position=position, progress=progress)
    _check_deepspeed(run.spec.training, processes)


def _check_deepspeed(training: TrainingSpec, processes: int) -> None:
    config = deepspeed_config(training, processes)  # checks the batch sizes divide
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig checks batch sizes against world size 1 outside a process group.
    config |= {"train_batch_size": config["train_batch_size"] // processes}
    try:
        DeepSpeedConfig(config)
    except Exception as e:
        raise SpecError(f"spec.training.deepspeed: {deepspeed_problem(e)}") from None
