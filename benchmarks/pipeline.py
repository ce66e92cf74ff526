"""End-to-end training tokens/s: ChatFlow's data pipeline against Hugging Face `datasets`.

Data: the tiny example's five sources (`chatflow example tiny`), each file copied `--copies` times
into a temporary directory; the example's tokenizer (LLaMA-style, extended vocabulary) and
seqLength. Both sides produce the same number N of seqLength-token blocks: one pass, the total
number of blocks ChatFlow packs the data into. Tokens counted are the blocks' real (non-padding)
tokens.

Ours: `prepare_sources` (load, render, tokenize, pack, write the cache), then N samples of the
Mixture following the example's linear schedule, its growth stretched over the N samples.
  cold  empty chatflow cache and empty Hugging Face datasets cache
  warm  the chatflow cache of the cold run
Baseline: the classic recipe. `load_dataset("json")` per source; records rendered to text as ours
renders them (pretrain text, parallel pairs both ways through the same template, instructions
through the same chat template, BOS/EOS as ours) and tokenized by a batched `.map` per source over
`to_iterable_dataset()`; `interleave_datasets` with static probabilities, seed 0, all_exhausted;
then a batched `.map` that applies `group_texts` (concatenate, cut into seqLength blocks, labels =
input_ids); N blocks. It is lazy, so it renders and tokenizes only the records it draws, and it
computes no loss masks.
  cold  empty Hugging Face datasets cache (the Arrow conversion is timed)
  warm  the datasets cache of its cold run
Its probabilities: the schedule's start weights (a static mixture as configured at step 0) and, as
a second baseline, the mean of start and end weights: the average mix ours follows over N samples.

Before timing, the script checks that both sides turn each source's first records into the same
token ids. Every measurement gets a freshly loaded tokenizer (loading is not timed). Every round
runs every pipeline with fresh caches; each time reported is the best of `--rounds` rounds, both
wall clock and the CPU time of this process (all its threads: steadier on a shared machine).

    .venv/bin/python benchmarks/pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import yaml

from chatflow.data.mixture import Mixture
from chatflow.data.pipeline import load_tokenizer, prepare_sources
from chatflow.data.render import Batch, Renderer, _alpaca_messages
from chatflow.data.sources import local_files
from chatflow.sampler import MixtureSampler, Position
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRunSpec, SourceSpec, parse_run

EXAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "tiny.yaml"
IDS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
OURS = "ours, dynamic schedule"
CHECKED = 200  # records per source whose tokens are compared


@dataclass(frozen=True)
class Result:
    blocks: int
    tokens: int
    seconds: float  # wall clock
    cpu_seconds: float  # this process, all threads (the tokenizer encodes on several)


class Timer:
    """Wall-clock and CPU time since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def result(self, blocks: int, tokens: int) -> Result:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return Result(blocks, tokens, wall, cpu)


def example_spec(workdir: Path, copies: int) -> ChatFlowRunSpec:
    """The tiny example with each source's file copied `copies` times into `workdir`."""
    document = yaml.safe_load(EXAMPLE.read_text())
    for source in document["spec"]["data"]["sources"]:
        directory = workdir / "data" / source["name"]
        directory.mkdir(parents=True)
        for i in range(copies):
            shutil.copyfile(EXAMPLE.parent / source["path"], directory / f"part-{i:02d}.jsonl")
        source["path"] = str(directory)
    return parse_run(document).spec


@contextmanager
def datasets_cache(directory: Path) -> Iterator[None]:
    """Point Hugging Face datasets' cache (used by both sides' `load_dataset`) at `directory`."""
    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = directory
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = previous


def ours(spec: ChatFlowRunSpec, tokenizer: Any, cache: Path, blocks: int | None) -> Result:
    """Prepare every source, then follow the schedule for `blocks` samples (None: one pass)."""
    timer = Timer()
    # One process, as the baseline (benchmarks/prepare.py measures the worker processes).
    packed = prepare_sources(spec, EXAMPLE.parent, cache, tokenizer, workers=1)
    blocks = blocks or sum(p.num_blocks for p in packed)
    schedule = dataclasses.replace(Schedule.from_spec(spec), knots=np.array([0.0, blocks]))
    mixture = Mixture(MixtureSampler(schedule, spec.training.seed), packed)
    samples = islice(mixture.samples(Position.start(len(packed))), blocks)
    tokens = sum(sample.tokens for sample in samples)
    return timer.result(blocks, tokens)


def baseline_tokens(source: SourceSpec, tokenizer: Any) -> Callable[[Batch], Batch]:
    """Records -> {"input_ids": [...]}: rendered to text as ours renders them, then tokenized.

    BOS and EOS are added as ids, not as text: a tokenizer that puts no space after special tokens
    (the example's) reads "<s>text" differently from "text".
    """
    renderer = Renderer(source, tokenizer)

    def tokens(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def render(batch: Batch) -> Batch:
        if source.kind == "instruction":
            conversations = (
                _alpaca_messages(batch) if source.format == "alpaca" else batch["messages"]
            )
            texts = tokenizer.apply_chat_template(
                conversations, chat_template=renderer.chat_template, tokenize=False
            )
            return {"input_ids": tokens(texts)}
        if source.kind == "pretrain":
            texts = batch[source.text_field]
        else:
            texts = renderer._parallel_texts(batch)
        texts = [t for t in texts if t and t.strip()]
        return {"input_ids": [renderer.prefix + ids + renderer.suffix for ids in tokens(texts)]}

    return render


def check_same_tokens(spec: ChatFlowRunSpec, tokenizer: Any) -> None:
    """Both sides turn each source's first records into the same token ids."""
    for source in spec.data.sources:
        files = [str(f) for f in local_files(source, EXAMPLE.parent) or []]
        records = datasets.load_dataset("json", data_files=files, split="train")[:CHECKED]
        theirs = baseline_tokens(source, tokenizer)(records)["input_ids"]
        if theirs != [ids for ids, _ in Renderer(source, tokenizer)(records)]:
            raise AssertionError(f"{source.name}: the baseline tokenizes differently")


def baseline(spec: ChatFlowRunSpec, tokenizer: Any, weights: np.ndarray, blocks: int) -> Result:
    """The classic `datasets` recipe, static `weights`, `blocks` blocks."""
    seq_length = spec.training.seq_length

    def group_texts(documents: list[list[int]]) -> Batch:
        ids = list(chain.from_iterable(documents))
        full = len(ids) // seq_length * seq_length
        cut = [ids[i : i + seq_length] for i in range(0, full, seq_length)]
        return {"input_ids": cut, "labels": [block.copy() for block in cut]}

    timer = Timer()
    documents = []
    for source in spec.data.sources:
        files = [str(f) for f in local_files(source, EXAMPLE.parent) or []]
        records = datasets.load_dataset("json", data_files=files, split="train")
        documents.append(
            records.to_iterable_dataset().map(
                baseline_tokens(source, tokenizer),
                batched=True,
                remove_columns=records.column_names,
                features=IDS,
            )
        )
    mixed = datasets.interleave_datasets(
        documents, probabilities=weights.tolist(), seed=0, stopping_strategy="all_exhausted"
    )
    packed = mixed.map(
        lambda batch: group_texts(batch["input_ids"]), batched=True, remove_columns=["input_ids"]
    )
    tokens = sum(len(row["input_ids"]) for row in islice(packed, blocks))
    return timer.result(blocks, tokens)


Measurements = dict[tuple[str, str], list[Result]]  # (pipeline, cache) -> one per round


def one_round(spec: ChatFlowRunSpec, work: Path, into: Measurements) -> None:
    """Every pipeline, cold then warm, with fresh caches under `work`."""

    def tokenizer() -> Any:
        return load_tokenizer(spec, EXAMPLE.parent)[0]

    def record(name: str, cache: str, result: Result) -> Result:
        into.setdefault((name, cache), []).append(result)
        return result

    with datasets_cache(work / "hf-ours"):
        chatflow_cache = work / "chatflow-cache"
        cold = record(OURS, "cold", ours(spec, tokenizer(), chatflow_cache, None))
        record(OURS, "warm", ours(spec, tokenizer(), chatflow_cache, cold.blocks))
    schedule = Schedule.from_spec(spec)
    for name, weights in [("start", schedule.weights[0]), ("mean", schedule.weights.mean(axis=0))]:
        with datasets_cache(work / f"hf-{name}"):
            for cache in ("cold", "warm"):
                result = baseline(spec, tokenizer(), weights, cold.blocks)
                record(f"baseline, static {name} weights", cache, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one copy, one round (smoke)")
    parser.add_argument("--copies", type=int, default=2, help="copies of each source's file")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each figure is the best")
    args = parser.parse_args()
    copies, rounds = (1, 1) if args.quick else (args.copies, args.rounds)
    datasets.disable_progress_bars()

    measurements: Measurements = {}
    with tempfile.TemporaryDirectory(prefix="chatflow-bench-") as tmp:
        work = Path(tmp)
        spec = example_spec(work, copies)
        with datasets_cache(work / "hf-check"):
            check_same_tokens(spec, load_tokenizer(spec, EXAMPLE.parent)[0])
        for i in range(rounds):
            one_round(spec, work / f"round-{i}", measurements)

    wall = {key: min(r.seconds for r in results) for key, results in measurements.items()}
    cpu = {key: min(r.cpu_seconds for r in results) for key, results in measurements.items()}
    tokens = {key: results[0].tokens for key, results in measurements.items()}
    print(
        f"{copies} cop{'y' if copies == 1 else 'ies'} of the tiny example's data, "
        f"seqLength {spec.training.seq_length}, N = {measurements[OURS, 'cold'][0].blocks:,} "
        f"blocks per pipeline; each time is the best of {rounds}\n"
    )
    print(
        "| pipeline | cache | tokens | wall s | tokens/s | ours / this"
        " | CPU s | tokens/CPU-s | ours / this (CPU) |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for (name, cache), count in tokens.items():
        cells = [name, cache, f"{count:,}"]
        for clock in (wall, cpu):
            rate, ours_rate = count / clock[name, cache], tokens[OURS, cache] / clock[OURS, cache]
            cells += [f"{clock[name, cache]:.2f}", f"{rate:,.0f}", f"{ours_rate / rate:.2f}x"]
        print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
