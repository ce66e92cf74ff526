"""The training loop: one process of `torchrun -m chatflow.train`.

    start    join the process group; find the newest complete checkpoint and its TrainerState
    data     tokenizer (+ vocabulary extension); every source packed (rank 0 first, then the rest
             read its cache); the mixture, read from the checkpoint's sampler position on
    model    the precision (`auto`: what the devices do natively); the model (+ new embedding
             rows) in a DeepSpeed engine; the checkpoint loaded
    loop     `train_step` per optimizer step, its result reported (metrics, progress, history);
             held-out evaluation and checkpoints every N steps; on SIGTERM a checkpoint, then
             exit 143 so the job restarts it
    end      the final model, save_pretrained with its tokenizer

The data order is a function of the sampler position and the RNG is reseeded from the step, so
resuming reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatflow.data.pipeline import build_mixture, load_tokenizer, prepare_sources
from chatflow.data.store import SourceExhausted
from chatflow.history import SampleLog
from chatflow.sampler import Position
from chatflow.spec import ChatFlowRun, SpecError, load_run
from chatflow.termination import termination_message
from chatflow.train import checkpoint, distributed, model
from chatflow.train.checkpoint import Checkpoints, TrainerState
from chatflow.train.data import StepLoader
from chatflow.train.deepspeed_config import deepspeed_config, gradient_accumulation
from chatflow.train.lr import lr_at
from chatflow.train.metrics import flops_per_token, peak_flops_from_env
from chatflow.train.precision import for_job
from chatflow.train.reporter import Reporter
from chatflow.train.step import evaluate, train_step
from chatflow.train.torchrun import PREEMPTED, mark_preempted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatflow.train")
    parser.add_argument("-f", "--file", required=True, type=Path, help="ChatFlowRun manifest")
    parser.add_argument("--output", required=True, type=Path, help="checkpoints and final model")
    parser.add_argument("--cache-dir", required=True, type=Path, help="packed-data cache")
    parser.add_argument(
        "--prepared",
        action="store_true",
        help="a preparation step ran (chatflow prepare): open the cache, do not prepare",
    )
    parser.add_argument(
        "--log-samples",
        action="store_true",
        # The variable reaches pods through a run's spec.env, which the command line does not.
        default=os.environ.get("CHATFLOW_LOG_SAMPLES") == "1",
        help="record every rank's global sample indices (or CHATFLOW_LOG_SAMPLES=1)",
    )
    args = parser.parse_args(argv)
    try:
        run = load_run(args.file)
        return train(
            run, args.file.parent, args.output, args.cache_dir, args.log_samples, args.prepared
        )
    except (SpecError, SourceExhausted) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank finds the same problem
            for line in str(e).splitlines():
                print(f"chatflow: error: {line}", file=sys.stderr)
            termination_message(str(e))
        return 2 if isinstance(e, SpecError) else 1


def train(
    run: ChatFlowRun,
    base_dir: Path,
    output: Path,
    cache_dir: Path,
    log_samples: bool = False,
    prepared: bool = False,
) -> int:
    spec, training = run.spec, run.spec.training
    names = spec.source_names
    place = distributed.init()
    checkpoints = Checkpoints(output / "checkpoints")
    if place.is_main:
        try:
            checkpoints.prepare()
        except OSError as e:
            raise SpecError(
                f"--output: cannot write checkpoints to {output}: {e.strerror}"
            ) from None
    distributed.barrier()
    resume = checkpoints.latest()
    state = Checkpoints.state(resume[1], names) if resume else None

    # --- data -----------------------------------------------------------------------------------
    position = state.position if state else Position.start(len(names))
    tokenizer, new_tokens = load_tokenizer(spec, base_dir)
    if not place.is_main:
        distributed.barrier()  # rank 0 prepares what is missing; the others then open its cache
    sources = prepare_sources(
        spec, base_dir, cache_dir, tokenizer, position=position, prepared=prepared
    )
    if place.is_main:
        distributed.barrier()
    mixture = build_mixture(spec, sources)
    accumulation = gradient_accumulation(training, place.world_size)
    data = StepLoader(
        mixture, position, place.rank, place.world_size, training.micro_batch_size, accumulation
    )

    # --- model ----------------------------------------------------------------------------------
    precision = for_job(training.precision, place.world_size, state.precision if state else None)
    torch.manual_seed(training.seed)
    config = deepspeed_config(training, place.world_size, precision.name)
    if state and state.world_size != place.world_size:
        config.setdefault("checkpoint", {})["load_universal"] = True
    engine = model.engine(model.load_model(run, base_dir, new_tokens, config), config, training)
    if resume:
        checkpoint.load(engine, resume[1], state, place.world_size, place.is_main)

    # --- loop -----------------------------------------------------------------------------------
    step = state.step if state else 0
    tokens = np.array(state.tokens if state else [0] * len(names))
    # MFU compares the whole job's throughput and peak, in the precision it trains in.
    device_peak = peak_flops_from_env(precision.name)
    reporter = Reporter(
        run,
        mixture,
        output,
        place.is_main,
        device_peak * place.world_size if device_peak else None,
        flops_per_token(engine.module.config, training.seq_length),
    )
    reporter.started(step, precision, resume[1] if resume else None)
    sample_log = SampleLog(output, place.rank) if log_samples else None
    preemption = _Preemption()

    engine.train()
    while step < training.total_steps:
        torch.manual_seed(training.seed + step)  # the RNG is a function of the step: resumable
        lr = lr_at(step, training.optimizer, training.total_steps)
        batches = data.next_step()
        result = train_step(engine, batches, lr, place, len(names), preemption.requested)
        step += 1
        tokens += result.tokens
        if sample_log:
            sample_log.write(step, batches.indices)
        reporter.step(step, result, data.position, tokens)

        if step % training.eval.every_steps == 0 or step == training.total_steps:
            reporter.held_out(step, evaluate(engine, mixture, place))
        if (
            result.stop
            or step % training.checkpoint.every_steps == 0
            or step == training.total_steps
        ):
            trainer_state = TrainerState(
                step, place.world_size, data.position, tuple(tokens.tolist()), precision.name
            )
            seconds = checkpoint.save(
                engine, checkpoints, trainer_state, names, training.checkpoint.keep, place.is_main
            )
            reporter.checkpoint(step, seconds)
        if result.stop:
            reporter.preempted(step)
            mark_preempted()
            return PREEMPTED

    model.save_model(engine, tokenizer, output / "model", place, training.zero_stage)
    reporter.finished(step, data.position, tokens, output / "model")
    return 0


class _Preemption:
    """Remembers a SIGTERM (Kubernetes' preemption notice) until the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True


if __name__ == "__main__":
    sys.exit(main())
