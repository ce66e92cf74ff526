from __future__ import annotations

import math
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from transformers import LlamaConfig, LlamaForCausalLM

from chatflow.spec import SourceSpec
from chatflow.train.metrics import TrainerMetrics, flops_per_token, peak_flops_from_env
from factories import SOURCES

SPECS = [SourceSpec.model_validate(s) for s in SOURCES]
NAMES = [s.name for s in SPECS]
SOURCE_LABELS = frozenset({"run", "source", "kind", "language"})


Scrape = Callable[[], tuple[dict[str, str], list[Sample]]]


@contextmanager
def serving(peak_flops: float | None = 1e12) -> Iterator[tuple[TrainerMetrics, Scrape]]:
    """Metrics served on a free port, and a function returning (family types, samples) from it."""
    metrics = TrainerMetrics("test-run", SPECS, peak_flops)
    url = f"http://127.0.0.1:{metrics.serve(0)}/metrics"

    def scrape() -> tuple[dict[str, str], list[Sample]]:
        with urllib.request.urlopen(url, timeout=5) as response:
            families = list(text_string_to_metric_families(response.read().decode()))
        # The text format carries each counter's `_created` timestamp as a gauge family of its own.
        families = [f for f in families if not f.name.endswith("_created")]
        return {f.name: f.type for f in families}, [s for f in families for s in f.samples]

    try:
        yield metrics, scrape
    finally:
        metrics.close()


def values(samples: list[Sample], name: str) -> dict[str, float]:
    """The series called `name`, keyed by source (or by phase, or '' when it has neither)."""
    found = [s for s in samples if s.name == name]
    return {s.labels.get("source", s.labels.get("phase", "")): s.value for s in found}


def record_everything(metrics: TrainerMetrics) -> None:
    metrics.schedule(0.25, 1, "warm", target=[0.4, 0.3, 0.2, 0.1], realised=[0.5, 0.25, 0.25, 0])
    metrics.consumed(samples=[5, 3, 2, 0], tokens=[320, 192, 128, 0], epochs=[0.5, 0.3, 0.2, 0])
    metrics.step(
        7, 2.5, 3e-4, 1.5, samples_per_second=4.0, tokens_per_second=256.0, flops_per_token=1e6
    )
    metrics.checkpoint(10, 2.0)
    metrics.held_out({0: 2.0, 2: 3.0})
    metrics.precision("fp32", "auto: the CPU has no amx_bf16 or avx512_bf16")


def test_every_family_is_served_with_bounded_labels() -> None:
    with serving() as (metrics, scrape):
        record_everything(metrics)
        types, samples = scrape()

    per_source = {
        "chatflow_mixture_target_ratio",
        "chatflow_mixture_realised_ratio",
        "chatflow_source_epochs",
        "chatflow_heldout_loss",
        "chatflow_heldout_perplexity",
        "chatflow_source_max_epochs",
    }
    run_only = {
        "chatflow_schedule_progress_ratio",
        "chatflow_schedule_phase",
        "chatflow_step",
        "chatflow_loss",
        "chatflow_learning_rate",
        "chatflow_grad_norm",
        "chatflow_samples_per_second",
        "chatflow_tokens_per_second",
        "chatflow_mfu_ratio",
        "chatflow_last_checkpoint_step",
    }
    info = {"chatflow_schedule_phase_info", "chatflow_precision_info"}
    source_counters = {"chatflow_source_samples", "chatflow_source_tokens"}
    run_counters = {"chatflow_samples", "chatflow_tokens", "chatflow_checkpoints"}
    assert types == {
        **dict.fromkeys(per_source | run_only | info, "gauge"),
        **dict.fromkeys(source_counters | run_counters, "counter"),
        "chatflow_checkpoint_duration_seconds": "histogram",
    }
    labels = {
        **dict.fromkeys(per_source | source_counters, SOURCE_LABELS),
        **dict.fromkeys(run_only | run_counters, frozenset({"run"})),
        "chatflow_schedule_phase_info": {"run", "phase"},
        "chatflow_precision_info": {"run", "precision", "reason"},
        "chatflow_checkpoint_duration_seconds_bucket": {"run", "le"},
        "chatflow_checkpoint_duration_seconds_count": {"run"},
        "chatflow_checkpoint_duration_seconds_sum": {"run"},
    }
    for sample in samples:
        assert set(sample.labels) == labels[sample.name.removesuffix("_total")]
        assert sample.labels["run"] == "test-run"

    zh_en = next(s for s in samples if s.labels.get("source") == "zh-en")
    assert (zh_en.labels["kind"], zh_en.labels["language"]) == ("parallel", "zh-en")
    assert values(samples, "chatflow_schedule_progress_ratio") == {"": 0.25}
    assert values(samples, "chatflow_schedule_phase") == {"": 1}
    assert values(samples, "chatflow_schedule_phase_info") == {"warm": 1}
    target = values(samples, "chatflow_mixture_target_ratio")
    assert target == dict(zip(NAMES, [0.4, 0.3, 0.2, 0.1], strict=True))
    assert values(samples, "chatflow_mixture_realised_ratio")["en-web"] == 0.5
    assert values(samples, "chatflow_source_samples_total")["en-web"] == 5
    assert values(samples, "chatflow_source_epochs")["en-web"] == 0.5
    assert values(samples, "chatflow_step") == {"": 7}
    assert values(samples, "chatflow_last_checkpoint_step") == {"": 10}
    assert values(samples, "chatflow_loss") == {"": 2.5}
    assert values(samples, "chatflow_learning_rate") == {"": 3e-4}
    assert values(samples, "chatflow_grad_norm") == {"": 1.5}
    assert values(samples, "chatflow_samples_per_second") == {"": 4.0}
    assert values(samples, "chatflow_tokens_per_second") == {"": 256.0}
    assert values(samples, "chatflow_mfu_ratio") == {"": pytest.approx(256e6 / 1e12)}
    assert values(samples, "chatflow_checkpoints_total") == {"": 1}
    assert values(samples, "chatflow_checkpoint_duration_seconds_count") == {"": 1}
    assert values(samples, "chatflow_checkpoint_duration_seconds_sum") == {"": 2.0}
    assert values(samples, "chatflow_heldout_loss") == {"en-web": 2.0, "zh-en": 3.0}
    (precision,) = [s for s in samples if s.name == "chatflow_precision_info"]
    assert (precision.labels["precision"], precision.value) == ("fp32", 1)
    assert precision.labels["reason"] == "auto: the CPU has no amx_bf16 or avx512_bf16"
    perplexity = values(samples, "chatflow_heldout_perplexity")
    assert perplexity == pytest.approx({"en-web": math.exp(2.0), "zh-en": math.exp(3.0)})


def test_counters_follow_totals_and_add_up() -> None:
    with serving() as (metrics, scrape):
        metrics.consumed([5, 3, 2, 0], tokens=[320, 192, 128, 0], epochs=[0.5, 0.3, 0.2, 0])
        metrics.consumed([9, 6, 4, 1], tokens=[576, 384, 256, 64], epochs=[0.9, 0.6, 0.4, 0.1])
        _, samples = scrape()

    per_source = values(samples, "chatflow_source_samples_total")
    assert per_source == dict(zip(NAMES, [9, 6, 4, 1], strict=True))
    assert values(samples, "chatflow_samples_total") == {"": sum(per_source.values())}
    tokens = values(samples, "chatflow_source_tokens_total")
    assert values(samples, "chatflow_tokens_total") == {"": sum(tokens.values())} == {"": 1280}


def test_a_resumed_run_starts_from_its_restored_totals() -> None:
    with serving() as (metrics, scrape):
        metrics.consumed([9, 6, 4, 1], tokens=[576, 384, 256, 64], epochs=[0.0] * 4)
        _, samples = scrape()
    assert values(samples, "chatflow_samples_total") == {"": 20}
    assert values(samples, "chatflow_source_tokens_total")["zh-web"] == 384


def test_phase_info_shows_only_the_current_phase() -> None:
    with serving() as (metrics, scrape):
        metrics.schedule(0.1, 0, "warm", target=[0.25] * 4, realised=[0.25] * 4)
        metrics.schedule(0.6, 1, "sft", target=[0.25] * 4, realised=[0.25] * 4)
        _, samples = scrape()
    assert values(samples, "chatflow_schedule_phase_info") == {"sft": 1}
    assert values(samples, "chatflow_schedule_phase") == {"": 1}


def step(metrics: TrainerMetrics, **changes: Any) -> None:
    arguments = {"step": 1, "loss": 2.0, "lr": 1e-4, "grad_norm": 1.0, "samples_per_second": 2.0}
    arguments |= {"tokens_per_second": 5e5, "flops_per_token": 1e6}
    metrics.step(**(arguments | changes))


def test_mfu_needs_peak_flops_and_flops_per_token() -> None:
    with serving(peak_flops=1e12) as (metrics, scrape):
        step(metrics)
        assert values(scrape()[1], "chatflow_mfu_ratio") == {"": pytest.approx(0.5)}
        step(metrics, flops_per_token=None, grad_norm=None)
        _, samples = scrape()
    assert values(samples, "chatflow_mfu_ratio") == {}
    assert values(samples, "chatflow_grad_norm") == {}

    with serving(peak_flops=None) as (metrics, scrape):
        step(metrics)
        _, samples = scrape()
    assert values(samples, "chatflow_mfu_ratio") == {}
    assert values(samples, "chatflow_loss") == {"": 2.0}


def test_a_diverged_held_out_loss_gives_infinite_perplexity() -> None:
    with serving() as (metrics, scrape):
        metrics.held_out({1: 1000.0})
        _, samples = scrape()
    assert values(samples, "chatflow_heldout_perplexity") == {"zh-web": math.inf}


def test_close_frees_the_port() -> None:
    first = TrainerMetrics("test-run", SPECS, peak_flops=None)
    port = first.serve(0)
    first.close()
    second = TrainerMetrics("test-run", SPECS, peak_flops=None)
    assert second.serve(port) == port
    second.close()


TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}


def test_flops_per_token_by_hand() -> None:
    # per layer: q 64·64 + k,v 2·64·32 + o 64·64 = 12,288; MLP 3·64·128 = 24,576
    # N = 2 · 36,864 + lm_head 64·1000 = 137,728; attention 12 · 2 layers · 64 · 32 tokens = 49,152
    assert flops_per_token(LlamaConfig(**TINY), seq_len=32) == 6 * 137_728 + 49_152


def test_flops_per_token_counts_the_models_matmul_weights() -> None:
    config = LlamaConfig(**TINY)
    model = LlamaForCausalLM(config)
    matmul_weights = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "norm" not in name and "embed" not in name
    )
    assert flops_per_token(config, seq_len=0) == 6 * matmul_weights


def test_peak_flops_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLOW_PEAK_FLOPS", "1.5e14")
    assert peak_flops_from_env("bf16") == peak_flops_from_env("fp32") == 1.5e14
    monkeypatch.delenv("CHATFLOW_PEAK_FLOPS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops_from_env("bf16") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert peak_flops_from_env("bf16") == 989e12
    assert peak_flops_from_env("fp32") is None  # the table's peaks are bf16's
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA GeForce RTX 4090")
    assert peak_flops_from_env("bf16") is None


def test_precision_info_shows_only_the_current_precision() -> None:
    with serving() as (metrics, scrape):
        metrics.precision("bf16", "set in spec.training.precision")
        metrics.precision("fp32", "auto: not every node has native bf16")
        _, samples = scrape()
    found = [s for s in samples if s.name == "chatflow_precision_info"]
    assert [(s.labels["precision"], s.labels["reason"], s.value) for s in found] == [
        ("fp32", "auto: not every node has native bf16", 1)
    ]
