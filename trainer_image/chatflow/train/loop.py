"""The training loop: one process of `torchrun -m chatflow.train`.

    start    join the process group; find the newest complete checkpoint
    data     tokenizer (+ vocabulary extension); every source packed (rank 0 first, then the rest
             read its cache); the mixture from the checkpoint's sampler position
    model    from_pretrained (+ new embedding rows); the precision (`auto`: what the devices do
             natively); DeepSpeed engine; checkpoint loaded
    loop     per optimizer step: micro-batches of this rank's share, one all-reduce of the step's
             loss and per-source counts; metrics, progress; held-out evaluation and checkpoints
             every N steps; on SIGTERM a checkpoint, then exit 143 so the job restarts it
    end      the final model, save_pretrained with its tokenizer

The data order is a function of the sampler position and the RNG is reseeded from the step, so
resuming reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatflow.data.mixture import Mixture
from chatflow.data.pipeline import (
    build_mixture,
    from_pretrained,
    load_model_config,
    load_tokenizer,
    prepare_sources,
)
from chatflow.data.store import SourceExhausted
from chatflow.sampler import Position
from chatflow.spec import ChatFlowRun, SpecError, TrainingSpec, load_run
from chatflow.train import distributed
from chatflow.train.checkpoint import Checkpoints
from chatflow.train.data import loader
from chatflow.train.deepspeed_config import (
    deepspeed_config,
    deepspeed_problem,
    gradient_accumulation,
)
from chatflow.train.lr import lr_at
from chatflow.train.metrics import TrainerMetrics, flops_per_token, peak_flops_from_env
from chatflow.train.precision import for_job
from chatflow.train.progress import Progress
from chatflow.train.torchrun import PREEMPTED, mark_preempted

# Where Kubernetes reads a container's termination message (its terminationMessagePath default).
TERMINATION_LOG = Path("/dev/termination-log")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatflow.train")
    parser.add_argument("-f", "--file", required=True, type=Path, help="ChatFlowRun manifest")
    parser.add_argument("--output", required=True, type=Path, help="checkpoints and final model")
    parser.add_argument("--cache-dir", required=True, type=Path, help="packed-data cache")
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
        return train(run, args.file.parent, args.output, args.cache_dir, args.log_samples)
    except (SpecError, SourceExhausted) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank finds the same problem
            for line in str(e).splitlines():
                print(f"chatflow: error: {line}", file=sys.stderr)
            _termination_message(str(e))
        return 2 if isinstance(e, SpecError) else 1


def _termination_message(message: str) -> None:
    """In a pod, the container's termination message: its pod's status shows it, and the
    operator reads it (a failed run's condition says the error; a finished run's progress is its
    final step)."""
    if TERMINATION_LOG.exists():
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(message)


def train(
    run: ChatFlowRun, base_dir: Path, output: Path, cache_dir: Path, log_samples: bool = False
) -> int:
    spec, training = run.spec, run.spec.training
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
    state = Checkpoints.state(resume[1]) if resume else None

    # --- data -----------------------------------------------------------------------------------
    tokenizer, new_tokens = load_tokenizer(spec, base_dir)
    if not place.is_main:
        distributed.barrier()  # rank 0 tokenizes and packs; the others then read its cache
    sources = prepare_sources(spec, base_dir, cache_dir, tokenizer)
    if place.is_main:
        distributed.barrier()
    mixture = build_mixture(spec, sources)
    names = spec.source_names
    position = Position.from_dict(state["position"], names) if state else Position.start(len(names))
    tokens_seen = np.array(
        [state["tokens"].get(n, 0) for n in names] if state else [0] * len(names)
    )

    # --- model ----------------------------------------------------------------------------------
    saved = state.get("precision") if state else None
    precision = for_job(training.precision, place.world_size, saved)
    torch.manual_seed(training.seed)
    model = _load_model(run, base_dir, new_tokens)
    config = deepspeed_config(training, place.world_size, precision.name)
    load_dir, tag = None, None
    if resume:
        load_dir, tag = checkpoints.root, resume[1].name
        if state["world_size"] != place.world_size:
            load_dir = _universal(resume[1], place)
            config.setdefault("checkpoint", {})["load_universal"] = True
    engine = _engine(model, config, training)
    if load_dir is not None:
        engine.load_checkpoint(str(load_dir), tag=tag)
    step = state["step"] if state else 0

    # --- loop -----------------------------------------------------------------------------------
    total_steps = training.total_steps
    accumulation = gradient_accumulation(training, place.world_size)
    batches = loader(mixture, position, place.rank, place.world_size, training.micro_batch_size)
    schedule = mixture.sampler.schedule
    metrics = progress = None
    if place.is_main:
        # MFU compares the whole job's throughput and peak, in the precision it trains in.
        device_peak = peak_flops_from_env(precision.name)
        job_peak = device_peak * place.world_size if device_peak else None
        metrics = TrainerMetrics(run.metadata.name, spec.data.sources, job_peak)
        metrics.precision(precision.name, precision.reason)
        if training.metrics_port:
            metrics.serve(training.metrics_port)
        progress = Progress(total_steps, names)
        progress.message("precision", precision=precision.name, reason=precision.reason)
        if resume:
            progress.message("resumed", step=step, checkpoint=str(resume[1]))
    flops = flops_per_token(model.config, training.seq_length)
    history = _History(output / "history.jsonl", place.is_main)
    history.write(event="precision", step=step, precision=precision.name, reason=precision.reason)
    sample_log = _SampleLog(output / "samples", place.rank) if log_samples else None
    preempted = _Preemption()

    engine.train()
    while step < total_steps:
        started = time.perf_counter()
        torch.manual_seed(training.seed + step)  # the RNG is a function of the step: resumable
        lr = lr_at(step, training.optimizer, total_steps)
        k = len(names)
        local = torch.zeros(2 * k + 2, dtype=torch.float64)  # loss, per-source samples/tokens, stop
        indices: list[int] = []
        micro_batches = [next(batches) for _ in range(accumulation)]
        # The loss is a mean over the global batch's target tokens, not a mean of micro-batch
        # means: the gradient then does not depend on how samples are grouped into micro-batches
        # and ranks, so a run resumed on another number of processes follows the same curve.
        targets = sum(int((b["labels"][:, 1:] >= 0).sum()) for b in micro_batches)
        global_targets = distributed.all_sum(torch.tensor([targets]))[0].to(place.device)
        for batch in micro_batches:
            loss = engine(
                input_ids=batch["input_ids"].to(place.device),
                labels=batch["labels"].to(place.device),
                num_items_in_batch=global_targets,
            ).loss
            # DeepSpeed divides by the accumulation steps and averages over ranks: undo both.
            engine.backward(loss * accumulation * place.world_size)
            engine.step()
            local[0] += loss.item()
            local[1 : k + 1] += torch.bincount(batch["source"], minlength=k)
            local[k + 1 : 2 * k + 1] += torch.bincount(
                batch["source"], weights=batch["tokens"].double(), minlength=k
            )
            indices += batch["index"].tolist()
        local[-1] = float(preempted.requested)
        total = distributed.all_sum(local)
        step += 1
        if sample_log:
            sample_log.write(step, indices)
        step_samples = total[1 : k + 1].numpy().astype(np.int64)
        step_tokens = total[k + 1 : 2 * k + 1].numpy().astype(np.int64)
        before, position = position, mixture.sampler.advance(position, training.global_batch_size)
        if not np.array_equal(np.subtract(position.cursors, before.cursors), step_samples):
            raise RuntimeError("the step's samples differ from the sampler's plan")  # a bug
        tokens_seen += step_tokens
        seconds = time.perf_counter() - started
        loss_value = float(total[0])

        if place.is_main:
            progress_units = schedule.progress(position.next_sample)
            target = schedule.weights_at(progress_units)
            realised = step_samples / step_samples.sum()
            phase_index, phase = schedule.phase_at(float(progress_units))
            blocks = [max(s.num_blocks, 1) for s in sources]
            epochs = [c / b for c, b in zip(position.cursors, blocks, strict=True)]
            metrics.schedule(
                float(schedule.fraction_done(progress_units)), phase_index, phase, target, realised
            )
            metrics.consumed(list(position.cursors), tokens_seen.tolist(), epochs)
            tokens_per_second = step_tokens.sum() / seconds
            metrics.step(
                step,
                loss_value,
                lr,
                _grad_norm(engine),
                training.global_batch_size / seconds,
                tokens_per_second,
                flops,
            )
            progress.update(step, position.next_sample, tokens_per_second, loss_value, lr, target)
            history.write(
                event="step",
                step=step,
                samples=position.next_sample,
                loss=loss_value,
                lr=lr,
                tokens_per_second=tokens_per_second,
                target=dict(zip(names, target.round(6).tolist(), strict=True)),
                realised=dict(zip(names, realised.round(6).tolist(), strict=True)),
            )

        if step % training.eval.every_steps == 0 or step == total_steps:
            losses = _evaluate(engine, mixture, place)
            if place.is_main and losses:
                metrics.held_out(losses)
                by_name = {names[i]: round(v, 4) for i, v in losses.items()}
                progress.message("held-out loss", step=step, **by_name)
                history.write(event="eval", step=step, loss=by_name)
        stop = bool(total[-1] > 0)
        if stop or step % training.checkpoint.every_steps == 0 or step == total_steps:
            seconds = _save_checkpoint(
                engine,
                checkpoints,
                place,
                step,
                position,
                tokens_seen,
                names,
                training.checkpoint.keep,
                precision.name,
            )
            if place.is_main:
                metrics.checkpoint(step, seconds)
                progress.message("checkpoint", step=step, seconds=round(seconds, 2))
        if stop:
            if place.is_main:
                progress.message("preempted: checkpoint saved, exiting", step=step)
            mark_preempted()
            return PREEMPTED

    _save_model(engine, tokenizer, output / "model", place, training.zero_stage)
    if place.is_main:
        progress.message("finished", step=step, model=str(output / "model"))
        progress.close()
        # In a pod, the run's last progress: the metrics endpoint is gone once the job succeeds.
        final = {"step": step, "samples": position.next_sample, "tokens": int(tokens_seen.sum())}
        _termination_message(json.dumps(final))
    return 0


# --- pieces of the loop --------------------------------------------------------------------------


def _load_model(run: ChatFlowRun, base_dir: Path, new_tokens: list) -> Any:
    from transformers import AutoModelForCausalLM

    from chatflow.vocab import extend_embeddings

    load_model_config(run.spec, base_dir)  # refuses a seqLength past the model's positions
    model = from_pretrained(
        lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        run.spec.model.base,
        base_dir,
        "spec.model.base",
        "model",
    )
    if new_tokens:
        extend_embeddings(model, new_tokens)
    model.config.use_cache = False  # no generation during training
    if run.spec.training.activation_checkpointing:
        model.activation_checkpointing_enable()
    return model


def _engine(model: Any, config: dict[str, Any], training: TrainingSpec) -> Any:
    import deepspeed

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        peak = training.optimizer.lr
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, training.optimizer, training.total_steps) / peak
        )

    try:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config, lr_scheduler=schedule
        )
    except Exception as e:  # DeepSpeed validates its config here
        raise SpecError(f"spec.training.deepspeed: {deepspeed_problem(e)}") from None
    return engine


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _evaluate(engine: Any, mixture: Mixture, place: distributed.Place) -> dict[int, float]:
    """Mean loss per target token on each source's held-out blocks, over all ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively); a
    rank without a block of its own repeats one with weight 0.
    """
    engine.eval()
    losses = {}
    with torch.no_grad():
        for k, packed in enumerate(mixture.sources):
            blocks = list(packed.held_out_blocks)
            if not blocks:
                continue
            sums = torch.zeros(2, dtype=torch.float64)
            for first in range(0, len(blocks), place.world_size):
                index = first + place.rank
                weight = 1.0 if index < len(blocks) else 0.0
                input_ids, labels, _ = packed.example(blocks[min(index, len(blocks) - 1)])
                labels = torch.from_numpy(labels)[None].to(place.device)
                loss = engine(
                    input_ids=torch.from_numpy(input_ids)[None].to(place.device), labels=labels
                ).loss
                targets = float((labels[:, 1:] >= 0).sum())
                sums += torch.tensor(
                    [loss.item() * targets * weight, targets * weight], dtype=torch.float64
                )
            total = distributed.all_sum(sums)
            if total[1] > 0:
                losses[k] = float(total[0] / total[1])
    engine.train()
    return losses


def _save_checkpoint(
    engine: Any,
    checkpoints: Checkpoints,
    place: distributed.Place,
    step: int,
    position: Position,
    tokens_seen: np.ndarray,
    names: tuple[str, ...],
    keep: int,
    precision: str,
) -> float:
    started = time.perf_counter()
    engine.save_checkpoint(str(checkpoints.staging), tag=Checkpoints.tag(step), save_latest=False)
    distributed.barrier()
    if place.is_main:
        state = {
            "step": step,
            "world_size": place.world_size,
            "position": position.to_dict(names),
            "tokens": dict(zip(names, tokens_seen.tolist(), strict=True)),
            "precision": precision,  # a resumed run must load it in the same one
        }
        checkpoints.publish(step, state, keep)
    distributed.barrier()
    return time.perf_counter() - started


def _universal(checkpoint: Path, place: distributed.Place) -> Path:
    """Convert a checkpoint saved by another world size to DeepSpeed's universal format."""
    target = checkpoint.parent / ".universal"
    if place.is_main:
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
    return target


def _save_model(
    engine: Any, tokenizer: Any, target: Path, place: distributed.Place, zero_stage: int
) -> None:
    """The final model in Hugging Face format: save_pretrained, loadable with from_pretrained."""
    # Under ZeRO-3 the weights are sharded: every rank takes part in gathering them.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if place.is_main:
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        engine.module.save_pretrained(staging, state_dict=state)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    distributed.barrier()


class _Preemption:
    """Remembers a SIGTERM (Kubernetes' preemption notice) until the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True


class _History:
    """Rank 0's step and eval records, appended to `history.jsonl` across restarts."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path if enabled else None

    def write(self, **record: Any) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")


class _SampleLog:
    """Every global sample index this rank trained on, per step (`--log-samples`, for audits)."""

    def __init__(self, directory: Path, rank: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rank-{rank}.jsonl"

    def write(self, step: int, indices: list[int]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "indices": indices}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
