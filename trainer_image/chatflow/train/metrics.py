"""The trainer's Prometheus metrics.

Only rank 0 creates and serves them: the mixture state is global and identical on every rank, and
the counters are all-reduced before they reach this object, so the other ranks would only repeat
its numbers. One scrape target per run also keeps the series count bounded.

The names, and their conventions, are in `chatflow.metric_names`. Every series carries `run` (the
ChatFlowRun's name); per-source series add `source`, `kind` and `language`, all taken from the
validated spec, so label cardinality is fixed by the manifest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from chatflow import metric_names as names
from chatflow.metric_names import SOURCE_LABELS
from chatflow.spec import SourceSpec

# bf16 dense peak FLOP/s per device (no sparsity), matched against torch.cuda.get_device_name().
# An fp32 run has no entry: its MFU needs CHATFLOW_PEAK_FLOPS.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# Checkpoints take seconds on a laptop and many minutes for a large model on a slow volume.
CHECKPOINT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, math.inf)


class TrainerMetrics:
    """Rank 0's view of the run, exported for Prometheus.

    Each instance has its own registry, so several can live in one process (tests, or a trainer
    started twice in-process) without clashing over metric names.

    Throughputs passed to `step` are the whole job's, so `peak_flops` must be too: the per-device
    peak times the world size, or None when unknown (no MFU is then exported).
    """

    def __init__(self, run: str, sources: Sequence[SourceSpec], peak_flops: float | None) -> None:
        self.run = run
        self.peak_flops = peak_flops
        self.registry = CollectorRegistry()
        self._source_labels = [(run, s.name, s.kind, s.language_label) for s in sources]
        # Totals last passed to consumed(): counters are raised by the difference.
        self._samples_seen = [0] * len(sources)
        self._tokens_seen = [0] * len(sources)
        self._server: WSGIServer | None = None

        def gauge(name: str, doc: str, labels: Sequence[str] = ("run",)) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        def counter(name: str, doc: str, labels: Sequence[str] = ("run",)) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        self._progress = gauge(names.SCHEDULE_PROGRESS, "fraction of the run done")
        self._phase = gauge(names.SCHEDULE_PHASE, "index of the current schedule phase")
        self._phase_info = gauge(
            names.SCHEDULE_PHASE_INFO, "1 for the current schedule phase", ("run", "phase")
        )
        self._target = gauge(names.MIXTURE_TARGET, "scheduled weight of the source", SOURCE_LABELS)
        self._realised = gauge(
            names.MIXTURE_REALISED,
            "fraction of the last step's samples drawn from the source",
            SOURCE_LABELS,
        )
        self._source_samples = counter(
            names.SOURCE_SAMPLES, "samples drawn from the source", SOURCE_LABELS
        )
        self._source_tokens = counter(
            names.SOURCE_TOKENS, "tokens drawn from the source", SOURCE_LABELS
        )
        self._source_epochs = gauge(
            names.SOURCE_EPOCHS, "passes made over the source", SOURCE_LABELS
        )
        max_epochs = gauge(
            names.SOURCE_MAX_EPOCHS,
            "passes over the source the run may make (maxEpochs); absent when unlimited",
            SOURCE_LABELS,
        )
        for labels, source in zip(self._source_labels, sources, strict=True):
            if source.max_epochs is not None:
                max_epochs.labels(*labels).set(source.max_epochs)
        self._samples = counter(names.SAMPLES, "samples trained on")
        self._tokens = counter(names.TOKENS, "tokens trained on")
        self._step_index = gauge(names.STEP, "optimizer steps completed")
        self._loss = gauge(names.LOSS, "training loss of the last step")
        self._lr = gauge(names.LEARNING_RATE, "learning rate of the last step")
        self._grad_norm = gauge(names.GRAD_NORM, "gradient norm before clipping")
        self._samples_per_second = gauge(names.SAMPLES_PER_SECOND, "training throughput")
        self._tokens_per_second = gauge(names.TOKENS_PER_SECOND, "training throughput")
        self._mfu = gauge(names.MFU, "model FLOPs utilisation: achieved / peak FLOP/s")
        self._precision_info = gauge(
            names.PRECISION_INFO,
            "1 for the precision the run trains in (bf16 or fp32) and why it was chosen",
            ("run", "precision", "reason"),
        )
        self._checkpoints = counter(names.CHECKPOINTS, "checkpoints saved")
        self._checkpoint_step = gauge(
            names.LAST_CHECKPOINT_STEP, "optimizer step of the newest checkpoint"
        )
        self._checkpoint_duration = Histogram(
            names.CHECKPOINT_DURATION,
            "time to save a checkpoint",
            ("run",),
            buckets=CHECKPOINT_BUCKETS,
            registry=self.registry,
        )
        self._heldout_loss = gauge(
            names.HELDOUT_LOSS, "loss on the source's held-out samples", SOURCE_LABELS
        )
        self._heldout_perplexity = gauge(
            names.HELDOUT_PERPLEXITY, "exp(held-out loss) of the source", SOURCE_LABELS
        )

    def serve(self, port: int) -> int:
        """Serve /metrics on all interfaces and return the bound port.

        Port 0 binds a free port (tests); the trainer skips calling this when `metricsPort` is 0.
        """
        self._server, _ = start_http_server(port, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        """Stop the HTTP server, freeing the port for the next run in the same process."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def schedule(
        self,
        progress: float,
        phase_index: int,
        phase: str,
        target: Sequence[float],
        realised: Sequence[float],
    ) -> None:
        """Where the schedule is, what it asks for, and what the last step actually drew."""
        self._progress.labels(self.run).set(progress)
        self._phase.labels(self.run).set(phase_index)
        # An info gauge must show only the current phase, or a query by phase sees two at once.
        self._phase_info.clear()
        self._phase_info.labels(self.run, phase).set(1)
        for labels, want, got in zip(self._source_labels, target, realised, strict=True):
            self._target.labels(*labels).set(want)
            self._realised.labels(*labels).set(got)

    def consumed(
        self, samples: Sequence[int], tokens: Sequence[int], epochs: Sequence[float]
    ) -> None:
        """Per-source totals since the run began (restored from the checkpoint on resume).

        A counter cannot be set, so each is raised by the difference to the new total; the exported
        value is thus the run's total, across restarts. After a restart the first call raises it
        from 0 to the restored total, which Prometheus sees as a counter reset.
        """
        rows = zip(self._source_labels, samples, tokens, epochs, strict=True)
        for i, (labels, n_samples, n_tokens, n_epochs) in enumerate(rows):
            self._source_samples.labels(*labels).inc(n_samples - self._samples_seen[i])
            self._source_tokens.labels(*labels).inc(n_tokens - self._tokens_seen[i])
            self._source_epochs.labels(*labels).set(n_epochs)
        self._samples.labels(self.run).inc(sum(samples) - sum(self._samples_seen))
        self._tokens.labels(self.run).inc(sum(tokens) - sum(self._tokens_seen))
        self._samples_seen, self._tokens_seen = list(samples), list(tokens)

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        samples_per_second: float,
        tokens_per_second: float,
        flops_per_token: float | None,
    ) -> None:
        """The last optimizer step. Unknown values (None) leave their series absent, not zero."""
        self._step_index.labels(self.run).set(step)
        self._loss.labels(self.run).set(loss)
        self._lr.labels(self.run).set(lr)
        self._samples_per_second.labels(self.run).set(samples_per_second)
        self._tokens_per_second.labels(self.run).set(tokens_per_second)
        self._set_or_clear(self._grad_norm, grad_norm)
        mfu = None
        if flops_per_token is not None and self.peak_flops:
            mfu = flops_per_token * tokens_per_second / self.peak_flops
        self._set_or_clear(self._mfu, mfu)

    def precision(self, precision: str, reason: str) -> None:
        """The precision the trainer resolved `spec.training.precision` to, and why."""
        self._precision_info.clear()
        self._precision_info.labels(self.run, precision, reason).set(1)

    def checkpoint(self, step: int, seconds: float) -> None:
        """A checkpoint of `step` was saved in `seconds`."""
        self._checkpoints.labels(self.run).inc()
        self._checkpoint_step.labels(self.run).set(step)
        self._checkpoint_duration.labels(self.run).observe(seconds)

    def held_out(self, losses: Mapping[int, float]) -> None:
        """Held-out loss by source index; sources without held-out samples are left out."""
        for i, loss in losses.items():
            labels = self._source_labels[i]
            self._heldout_loss.labels(*labels).set(loss)
            # math.exp overflows past ~709; a diverged run must not crash on its metrics.
            self._heldout_perplexity.labels(*labels).set(math.exp(loss) if loss < 700 else math.inf)

    def _set_or_clear(self, gauge: Gauge, value: float | None) -> None:
        if value is None:
            gauge.clear()
        else:
            gauge.labels(self.run).set(value)


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token of a LLaMA-style transformers config, as torchtitan counts them.

    6·N for the forward and backward matmuls over the weights, plus 12·L·H·T for attention scores
    and values (causal sparsity ignored, by convention). N counts the weights every token is
    multiplied by: attention (with grouped-query K/V), the gated MLP and the LM head; not the input
    embedding, which is a lookup. Norm weights are negligible and cost no matmul.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = config.num_hidden_layers
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * config.intermediate_size
    params = layers * (attention + mlp) + hidden * config.vocab_size
    return float(6 * params + 12 * layers * heads * head_dim * seq_len)


def peak_flops_from_env(precision: str) -> float | None:
    """Peak FLOP/s of one device training in `precision` (resolved), for MFU; None when unknown.

    Unknown: on CPU, on a GPU the table does not list, and in fp32. `CHATFLOW_PEAK_FLOPS`
    overrides the table, for any of these.
    """
    override = os.environ.get("CHATFLOW_PEAK_FLOPS")
    if override:
        return float(override)
    import torch  # lazily: the metrics themselves do not need torch

    if precision != "bf16" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for model, peak in PEAK_FLOPS.items() if model in name), None)
