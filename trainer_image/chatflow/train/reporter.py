"""What rank 0 tells the world about the run, one call per event: Prometheus metrics
(`metrics.py`), the progress bar or JSON log lines (`progress.py`), `history.jsonl`
(`chatflow.history`), and in a TrainJob its status (`trainer_status.py`). On the other ranks
every call does nothing: after the step's all-reduce they would only repeat rank 0's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from chatflow import metric_names
from chatflow.data.mixture import Mixture
from chatflow.history import History
from chatflow.sampler import Position
from chatflow.spec import ChatFlowRun
from chatflow.termination import termination_message
from chatflow.train.metrics import TrainerMetrics
from chatflow.train.precision import Precision
from chatflow.train.progress import Progress
from chatflow.train.step import StepResult
from chatflow.train.trainer_status import TrainerStatus


class Reporter:
    def __init__(
        self,
        run: ChatFlowRun,
        mixture: Mixture,
        output: Path,
        is_main: bool,
        peak_flops: float | None,
        flops_per_token: float,
    ) -> None:
        """`peak_flops`: the whole job's peak FLOP/s in its precision, for MFU (None: unknown)."""
        self.is_main = is_main
        self.names = run.spec.source_names
        self.mixture = mixture
        self.flops_per_token = flops_per_token
        self.history = History(output, is_main)
        if not is_main:
            return
        training = run.spec.training
        self.metrics = TrainerMetrics(run.metadata.name, run.spec.data.sources, peak_flops)
        if training.metrics_port:
            self.metrics.serve(training.metrics_port)
        self.progress = Progress(training.total_steps, self.names)
        self.status = TrainerStatus.from_env(training.total_steps)  # None outside a TrainJob

    def started(self, step: int, precision: Precision, checkpoint: Path | None) -> None:
        """Training starts at `step`, from `checkpoint` if it resumes one."""
        if not self.is_main:
            return
        self.metrics.precision(precision.name, precision.reason)
        self.progress.message("precision", precision=precision.name, reason=precision.reason)
        if checkpoint is not None:
            self.progress.message("resumed", step=step, checkpoint=str(checkpoint))
        if self.status:
            self.status.started(step)
        self.history.write(
            "precision", step=step, precision=precision.name, reason=precision.reason
        )

    def step(self, step: int, result: StepResult, position: Position, tokens: np.ndarray) -> None:
        """Step `step` done: the run is at `position`, with `tokens` trained on per source."""
        if not self.is_main:
            return
        schedule = self.mixture.sampler.schedule
        progress = schedule.progress(position.next_sample)
        target = schedule.weights_at(progress)
        realised = result.samples / result.samples.sum()
        phase_index, phase = schedule.phase_at(float(progress))
        blocks = [max(s.num_blocks, 1) for s in self.mixture.sources]
        epochs = [c / b for c, b in zip(position.cursors, blocks, strict=True)]
        fraction = float(schedule.fraction_done(progress))
        self.metrics.schedule(fraction, phase_index, phase, target, realised)
        self.metrics.consumed(list(position.cursors), tokens.tolist(), epochs)
        self.metrics.step(
            step,
            result.loss,
            result.lr,
            result.grad_norm,
            result.samples.sum() / result.seconds,
            result.tokens_per_second,
            self.flops_per_token,
        )
        self.progress.update(
            step, position.next_sample, result.tokens_per_second, result.loss, result.lr, target
        )
        self.history.write(
            "step",
            step=step,
            samples=position.next_sample,
            loss=result.loss,
            lr=result.lr,
            tokens_per_second=result.tokens_per_second,
            target=dict(zip(self.names, target.round(6).tolist(), strict=True)),
            realised=dict(zip(self.names, realised.round(6).tolist(), strict=True)),
        )
        if self.status:
            # By their Prometheus names; the phase by its name, the label of its info series.
            self.status.update(
                step,
                {
                    metric_names.STEP: step,
                    metric_names.LOSS: result.loss,
                    metric_names.TOKENS_PER_SECOND: result.tokens_per_second,
                    metric_names.SCHEDULE_PROGRESS: fraction,
                    metric_names.SCHEDULE_PHASE_INFO: phase,
                },
            )

    def held_out(self, step: int, losses: dict[int, float]) -> None:
        """Held-out loss by source index, after `step`."""
        if not self.is_main or not losses:
            return
        self.metrics.held_out(losses)
        by_name = {self.names[i]: round(v, 4) for i, v in losses.items()}
        self.progress.message("held-out loss", step=step, **by_name)
        self.history.write("eval", step=step, loss=by_name)

    def checkpoint(self, step: int, seconds: float) -> None:
        if self.is_main:
            self.metrics.checkpoint(step, seconds)
            self.progress.message("checkpoint", step=step, seconds=round(seconds, 2))

    def preempted(self, step: int) -> None:
        if self.is_main:
            self.progress.message("preempted: checkpoint saved, exiting", step=step)

    def finished(self, step: int, position: Position, tokens: np.ndarray, model: Path) -> None:
        if not self.is_main:
            return
        self.progress.message("finished", step=step, model=str(model))
        self.progress.close()
        if self.status:
            self.status.finish()
        # In a pod, the run's last progress: the metrics endpoint is gone once the job succeeds.
        final = {"step": step, "samples": position.next_sample, "tokens": int(tokens.sum())}
        termination_message(json.dumps(final))
