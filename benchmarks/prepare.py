"""Data preparation: tokens/s per worker, and time to first step on a run that needs 1% of a source.

Text: mixed English and Chinese jsonl documents, generated deterministically (a seeded RNG per file)
from spans of the tiny example's data: runs of words of its English docstrings (`en.jsonl`) and runs
of characters of its Chinese reviews (`zh.jsonl`); 60% English, 30% Chinese, 10% alternating, with
a log-normal number of spans per document (from a few dozen bytes to tens of kilobytes), in files
of at most 64 MiB, which the preparation splits into its byte-range input shards. Tokenizer: the
tiny example's (LLaMA-style 32k SentencePiece, with the example's 2,000 added Chinese tokens),
loaded as the run loads it, a fresh copy per measurement. TOKENIZERS_PARALLELISM=false on both
sides: one process, one core. The run: that tokenizer, one pretrain source, seqLength 512.

1. Throughput. One source over the first `--throughput-mib` of the text; a run long enough to need
   all of it. Ours: `prepare_sources` with 1 worker (in this process) and with 2 (forked
   processes), on an empty cache; the prepare call is timed, not the tokenizer's loading.
   Baseline: Megatron-LM's preprocess_data.py recipe in one process: read the jsonl lines,
   json.loads, `backend_tokenizer.encode_batch(texts, add_special_tokens=False)` in batches of
   1000, each document's ids + EOS appended to one flat uint32 array written to a file. Before
   timing, the script checks that both sides give the same token ids for the first documents; after
   it, that ours wrote exactly the baseline's tokens plus one BOS per document. Each figure is the
   best of `--rounds` rounds, wall clock and CPU time (of every process) apart. Worker start-up is
   measured apart: an "empty" preparation of 2 one-record files (2 shards).
2. Time to first step. One source over `--source-gib` of the text. Ours, 2 workers on both sides,
   each on an empty cache: preparation, opening the source, building the mixture and reading the
   first global batch (512 samples) through `chatflow.train.data.loader` (the model's forward and
   backward, the same on both sides, is left out). Baseline: the same code with a run long enough
   to need the whole source (checked: every shard prepared, every input byte read). The run under
   test takes `--need` (1%) of the whole source's blocks as its samples. Measured once each.

    .venv/bin/python benchmarks/prepare.py [--smoke] [--only PART] [--json FILE] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import logging
import os
import platform
import pstats
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import islice
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from chatflow.data import sources as sources_module
from chatflow.data.pipeline import build_mixture, load_tokenizer, prepare_sources
from chatflow.data.prepare import needed_samples
from chatflow.data.render import Renderer
from chatflow.data.sources import read_shard
from chatflow.data.store import (
    blocks_needed,
    entry_directory,
    read_listing,
    read_shard_meta,
    write_shard,
)
from chatflow.sampler import Position
from chatflow.spec import ChatFlowRunSpec, parse_run
from chatflow.train.data import loader

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "tiny.yaml"
DATA = EXAMPLE.parent / "tiny-assets" / "data"
WORK = Path("/var/tmp/chatflow-bench-prepare")
SOURCE = "web"
BATCH = 1000  # the baseline's documents per encode_batch (Megatron's default chunk)
CHECKED = 2000  # documents whose token ids both sides must agree on
THROUGHPUT_GOAL = 0.8  # ours with 1 worker / baseline
FIRST_STEP_GOAL = 50.0  # whole source / 1% of it


# --- the text ---------------------------------------------------------------------------------


class TextMaker:
    """Documents made of spans of the tiny example's English and Chinese text."""

    def __init__(self) -> None:
        en = [json.loads(line)["text"] for line in (DATA / "en.jsonl").open()]
        zh = [json.loads(line)["text"] for line in (DATA / "zh.jsonl").open()]
        self.en = "\n".join(en)
        self.zh = "".join(zh)
        # Where English words start: spans start and end there, so no word is cut.
        self.words = np.array([0] + [m.end() for m in re.finditer(r"\s+", self.en)])

    def _english(self, rng: np.random.Generator, spans: int) -> list[str]:
        starts = self.words[rng.integers(len(self.words) - 1, size=spans)]
        ends = np.searchsorted(self.words, starts + rng.integers(40, 400, size=spans))
        ends = self.words[np.minimum(ends, len(self.words) - 1)]
        return [self.en[a:b].strip() for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]

    def _chinese(self, rng: np.random.Generator, spans: int) -> list[str]:
        starts = rng.integers(len(self.zh) - 80, size=spans).tolist()
        lengths = rng.integers(8, 80, size=spans).tolist()
        return [self.zh[a : a + n] for a, n in zip(starts, lengths, strict=True)]

    def document(self, rng: np.random.Generator) -> str:
        kind = rng.choice(3, p=[0.6, 0.3, 0.1])  # English, Chinese, both in turn
        spans = int(np.clip(np.rint(rng.lognormal(np.log(6), 1.0)), 1, 300))
        if kind == 0:
            return " ".join(self._english(rng, spans))
        if kind == 1:
            return "".join(self._chinese(rng, spans))
        english, chinese = self._english(rng, spans), self._chinese(rng, spans)
        return " ".join(english[i] if i % 2 == 0 else chinese[i] for i in range(spans))

    def write(self, path: Path, size: int, seed: int) -> None:
        """Whole jsonl lines up to `size` bytes, the same for the same seed."""
        rng = np.random.default_rng([seed, 20261203])
        lines, written = [], 0
        while True:
            text = self.document(rng)
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode()
            if written + len(line) > size:
                break
            lines.append(line)
            written += len(line)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(b"".join(lines))
        tmp.rename(path)  # a killed run leaves no short file for --corpus to take


_maker: TextMaker | None = None


def _write_file(task: tuple[Path, int, int]) -> None:
    global _maker
    _maker = _maker or TextMaker()
    _maker.write(*task)


def make_corpus(directory: Path, files: int, file_bytes: int) -> list[Path]:
    """`files` jsonl files of `file_bytes` (at most) each; file i is the same whatever `files`.

    Files already there (a --corpus of an earlier run with the same sizes) are kept.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"part-{file_bytes >> 20}m-{i:05d}.jsonl" for i in range(files)]
    tasks = [(p, file_bytes, i) for i, p in enumerate(paths) if not p.exists()]
    if tasks:
        with Pool(min(os.cpu_count() or 1, len(tasks))) as pool:
            pool.map(_write_file, tasks, chunksize=1)
    return paths


def link_files(directory: Path, files: list[Path]) -> Path:
    """A directory of links to `files`: a source over exactly them."""
    directory.mkdir(parents=True)
    for f in files:
        (directory / f.name).symlink_to(f)
    return directory


# --- the run ----------------------------------------------------------------------------------


def run_spec(
    data: Path, seq_length: int, samples: int, global_batch: int, held_out: int = 8
) -> ChatFlowRunSpec:
    """The tiny example's model and tokenizer, one pretrain source over `data`, `samples` samples.

    `held_out`: training.eval.samplesPerSource (the example's 8).
    """
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["name"] = "bench-prepare"
    spec = document["spec"]
    spec["data"] = {
        "sources": [{"name": SOURCE, "kind": "pretrain", "path": str(data), "language": "en"}]
    }
    spec["schedule"] = {"curve": "stages", "stages": [{"weights": {SOURCE: 1.0}}]}
    training = spec["training"]
    training.pop("maxSteps")
    training |= {
        "seqLength": seq_length,
        "globalBatchSize": global_batch,
        "microBatchSize": global_batch,
        "maxSamples": max(samples, global_batch),
        "metricsPort": 0,
    }
    training["eval"]["samplesPerSource"] = held_out
    return parse_run(document).spec


def whole_run_samples(files: list[Path], seq_length: int) -> int:
    """Samples enough to need every block: a token takes at least one byte of the input."""
    return sum(f.stat().st_size for f in files) // seq_length + 1


_tokenizers: dict[str, Any] = {}


def tokenizer_of(spec: ChatFlowRunSpec) -> Any:
    """A fresh copy of the run's tokenizer (nothing in its caches), loaded once."""
    key = spec.model.model_dump_json()
    if key not in _tokenizers:
        _tokenizers[key] = load_tokenizer(spec, EXAMPLE.parent)[0]
    return copy.deepcopy(_tokenizers[key])  # through pickle: the tokenizer's JSON


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Measured:
    seconds: float  # wall clock
    cpu_seconds: float  # this process and the children it waited for, all threads
    tokens: int = 0
    documents: int = 0
    shards: int = 0  # shards prepared (ours)
    read_bytes: int = 0  # input bytes read (ours)


class Clock:
    """Wall-clock and CPU time (this process plus its finished children) since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def stop(self) -> Measured:
        return Measured(time.perf_counter() - self.wall, self._cpu() - self.cpu)


def prepared_counts(spec: ChatFlowRunSpec, cache: Path, tokenizer: Any) -> tuple[int, ...]:
    """(shards prepared, shards listed, tokens, documents, input bytes read) of the one source."""
    source, seq_length = spec.data.sources[0], spec.training.seq_length
    entry = entry_directory(source, EXAMPLE.parent, cache, tokenizer, seq_length)
    listing = read_listing(entry) or []
    metas = [m for i in range(len(listing)) if (m := read_shard_meta(entry, i)) is not None]
    return (
        len(metas),
        len(listing),
        sum(m["tokens"] for m in metas),
        sum(m["documents"] for m in metas),
        sum(m["read_bytes"] for m in metas),
    )


def ours(spec: ChatFlowRunSpec, cache: Path, workers: int) -> Measured:
    """`prepare_sources` on an empty cache with `workers` workers: the call alone is timed."""
    tokenizer = tokenizer_of(spec)
    shutil.rmtree(cache, ignore_errors=True)
    clock = Clock()
    prepare_sources(spec, EXAMPLE.parent, cache, tokenizer, workers=workers)
    result = clock.stop()
    shards, _, result.tokens, result.documents, result.read_bytes = prepared_counts(
        spec, cache, tokenizer
    )
    result.shards = shards
    shutil.rmtree(cache)
    return result


def baseline(files: list[Path], tokenizer: Any, out: Path) -> Measured:
    """Megatron's preprocess_data.py recipe: encode_batch of 1000 texts, ids + EOS, a flat file."""
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    tokens = documents = 0
    clock = Clock()
    with open(out, "wb") as flat:

        def encode(texts: list[str]) -> None:
            nonlocal tokens, documents
            ids: list[int] = []
            for encoding in backend.encode_batch(texts, add_special_tokens=False):
                ids += encoding.ids
                ids.append(eos)
            array = np.array(ids, dtype=np.uint32)
            array.tofile(flat)
            tokens += len(array)
            documents += len(texts)

        for path in files:
            with open(path, encoding="utf-8") as f:
                texts = []
                for line in f:
                    texts.append(json.loads(line)["text"])
                    if len(texts) == BATCH:
                        encode(texts)
                        texts = []
                if texts:
                    encode(texts)
        flat.flush()
        os.fsync(flat.fileno())  # as ours does before publishing a shard
    result = clock.stop()
    result.tokens, result.documents = tokens, documents
    out.unlink()
    return result


def check_same_tokens(spec: ChatFlowRunSpec, files: list[Path]) -> None:
    """The first CHECKED documents: ours' ids are BOS + the baseline's ids + EOS."""
    tokenizer = tokenizer_of(spec)
    with open(files[0], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in islice(f, CHECKED)]
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    theirs = [[*e.ids, tokenizer.eos_token_id] for e in encoded]
    documents = Renderer(spec.data.sources[0], tokenizer)({"text": texts})
    if [ids[1:] for ids, _ in documents] != theirs:
        raise AssertionError("ours and the baseline tokenize the same text differently")
    if any(ids[0] != tokenizer.bos_token_id for ids, _ in documents):
        raise AssertionError("ours should open every document with BOS")


def first_step(spec: ChatFlowRunSpec, cache: Path, workers: int) -> dict[str, Any]:
    """Prepare, open, build the mixture, read the first global batch; empty cache."""
    tokenizer = tokenizer_of(spec)
    shutil.rmtree(cache, ignore_errors=True)
    clock = Clock()
    packed = prepare_sources(spec, EXAMPLE.parent, cache, tokenizer, workers=workers)
    prepared = time.perf_counter() - clock.wall
    mixture = build_mixture(spec, packed)
    batch = next(
        loader(mixture, Position.start(1), 0, 1, micro_batch_size=spec.training.global_batch_size)
    )
    result = clock.stop()
    shards, listed, tokens, documents, read = prepared_counts(spec, cache, tokenizer)
    samples = needed_samples(spec)[0]
    held_out = spec.training.eval.samples_per_source
    return {
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,
        "prepare_seconds": prepared,
        "samples": samples,
        "need_blocks": held_out + blocks_needed(samples),
        "blocks_prepared": packed[0].blocks,
        "complete": packed[0].complete,
        "shards_prepared": shards,
        "shards_listed": listed,
        "tokens": tokens,
        "documents": documents,
        "read_bytes": read,
        "first_batch": list(batch["input_ids"].shape),
    }


def profile_shard(spec: ChatFlowRunSpec, directory: Path, rows: int) -> str:
    """cProfile of `write_shard` on the source's first input shard, in this process."""
    tokenizer = tokenizer_of(spec)
    source = spec.data.sources[0]
    shard = sources_module.input_shards(source, EXAMPLE.parent)[0]
    entry = directory / "profile-entry"
    entry.mkdir(parents=True)
    profiler = cProfile.Profile()
    profiler.enable()
    write_shard(entry, 0, shard, source, EXAMPLE.parent, tokenizer, spec.training.seq_length)
    profiler.disable()
    shutil.rmtree(entry)
    reading = Clock()
    for _ in read_shard(source, EXAMPLE.parent, shard):
        pass
    read_only = reading.stop().seconds
    stats = pstats.Stats(profiler)
    lines = [f"cProfile of write_shard on {shard} (reading + json.loads alone: {read_only:.2f} s)"]
    for order in ("tottime", "cumulative"):
        text = _stats_text(stats, order, rows)
        lines.append(text)
    return "\n".join(lines)


def _stats_text(stats: pstats.Stats, order: str, rows: int) -> str:
    import io

    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(order).print_stats(rows)
    return out.getvalue()


# --- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import datasets
    import tokenizers
    import torch
    import transformers

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = re.search(r"Model name:\s*(.+)", lscpu)
        model = cpu.group(1).strip() if cpu else platform.processor()
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
        "commit": commit,
    }


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --- main -------------------------------------------------------------------------------------


def best(results: list[Measured]) -> Measured:
    return min(results, key=lambda r: r.seconds)


def measure_throughput(
    args: argparse.Namespace, files: list[Path], work: Path
) -> tuple[dict[str, Any], ChatFlowRunSpec]:
    """Part 1: the baseline, ours with 1 and 2 workers, and empty preparations; `rounds` times."""
    data = link_files(work / "throughput", files)
    spec = run_spec(data, args.seq_length, whole_run_samples(files, args.seq_length), 512)
    check_same_tokens(spec, files)
    tiny = link_files(work / "tiny", [])
    for i in range(2):
        with open(files[0], encoding="utf-8") as f:
            (tiny / f"part-{i}.jsonl").write_text(next(f))
    tiny_spec = run_spec(tiny, args.seq_length, 10**6, 512, held_out=0)
    runs: dict[str, list[Measured]] = {}
    load_before = load()
    for _ in range(args.rounds):
        result = baseline(files, tokenizer_of(spec), work / "flat.bin")
        runs.setdefault("baseline", []).append(result)
        print(f"  baseline: {result.seconds:.1f} s", flush=True)
        for workers in (1, 2):
            result = ours(spec, work / "cache", workers)
            runs.setdefault(f"ours {workers}", []).append(result)
            print(f"  ours, {workers} worker(s): {result.seconds:.1f} s", flush=True)
            if not args.smoke:  # a pool's start-up is most of a smoke run's time
                empty = ours(tiny_spec, work / "cache", workers)
                runs.setdefault(f"empty {workers}", []).append(empty)
    base, one, two = (best(runs[name]) for name in ("baseline", "ours 1", "ours 2"))
    if one.tokens - one.documents != base.tokens or two.tokens != one.tokens:
        raise AssertionError(
            f"tokens written: baseline {base.tokens:,}, ours {one.tokens:,} with "
            f"{one.documents:,} documents (1 worker), {two.tokens:,} (2 workers)"
        )
    return {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "rounds": args.rounds,
        "best": {name: asdict(best(r)) for name, r in runs.items()},
        "best_cpu_seconds": {name: min(m.cpu_seconds for m in r) for name, r in runs.items()},
        "all": {name: [asdict(m) for m in r] for name, r in runs.items()},
        "load_average": [load_before, load()],
    }, spec


def measure_first_step(args: argparse.Namespace, files: list[Path], work: Path) -> dict[str, Any]:
    """Part 2: time to first step needing the whole source, then needing `args.need` of it."""
    data = link_files(work / "source", files)
    whole_spec = run_spec(
        data, args.seq_length, whole_run_samples(files, args.seq_length), args.global_batch
    )
    load_before = load()
    whole = first_step(whole_spec, work / "cache-whole", 2)
    print(f"  whole source: {whole['seconds']:.1f} s", flush=True)
    source_bytes = sum(f.stat().st_size for f in files)
    if not whole["complete"] or whole["read_bytes"] != source_bytes:
        raise AssertionError(f"the whole side did not read the whole source: {whole}")
    shutil.rmtree(work / "cache-whole")
    train_blocks = whole["blocks_prepared"] - whole_spec.training.eval.samples_per_source
    part_spec = run_spec(data, args.seq_length, round(args.need * train_blocks), args.global_batch)
    part = first_step(part_spec, work / "cache-part", 2)
    print(f"  {args.need:.0%} of it: {part['seconds']:.1f} s", flush=True)
    shutil.rmtree(work / "cache-part")
    return {
        "files": len(files),
        "bytes": source_bytes,
        "shard_bytes": sources_module.SHARD_BYTES,
        "whole": whole,
        "part": part,
        "load_average": [load_before, load()],
    }


def report_throughput(r: dict[str, Any]) -> dict[str, Any]:
    measured = {name: Measured(**m) for name, m in r["best"].items()}
    cpu_best = r["best_cpu_seconds"]
    base, one, two = measured["baseline"], measured["ours 1"], measured["ours 2"]
    print(
        f"\n1. Throughput: {r['files']} files, {r['bytes'] / 2**20:,.0f} MiB of jsonl, "
        f"{base.documents:,} documents, {base.tokens:,} tokens (baseline); "
        f"TOKENIZERS_PARALLELISM=false; best of {r['rounds']}; load average before and after: "
        f"{' | '.join(r['load_average'])}\n"
    )
    print(
        "| preparation | workers | wall s | tokens/s | tokens/s per worker | ours / baseline"
        " (per worker) | CPU s | tokens/CPU-s | ours / baseline (CPU) |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    rows = [
        ("baseline: Megatron recipe, `encode_batch` to a flat uint32 file", 1, "baseline"),
        ("ours: `prepare_sources`", 1, "ours 1"),
        ("ours: `prepare_sources`", 2, "ours 2"),
    ]
    for name, workers, key in rows:
        # Same input on every row, so ratios are of times: the baseline's over ours per worker
        # (wall clock), and the baseline's over ours' CPU time (every process, all threads).
        m, cpu = measured[key], cpu_best[key]
        print(
            f"| {name} | {workers} | {m.seconds:.1f} | {m.tokens / m.seconds:,.0f}"
            f" | {m.tokens / m.seconds / workers:,.0f}"
            f" | {base.seconds / (m.seconds * workers):.2f}x | {cpu:.1f} | {m.tokens / cpu:,.0f}"
            f" | {cpu_best['baseline'] / cpu:.2f}x |"
        )
    scaling, ratio = one.seconds / two.seconds, base.seconds / one.seconds
    print(
        f"\nours, 1 worker / baseline: {ratio:.2f}x (goal >= {THROUGHPUT_GOAL}x: "
        f"{'met' if ratio >= THROUGHPUT_GOAL else 'NOT MET'}); 2 workers / 1 worker: "
        f"{scaling:.2f}x ({scaling / 2:.0%} of linear); baseline "
        f"{base.tokens / base.seconds:,.0f} tokens/s"
    )
    empty = {w: measured[f"empty {w}"] for w in (1, 2) if f"empty {w}" in measured}
    if empty:
        print(
            f"worker start-up (an empty preparation: 2 one-record shards, fresh cache): "
            f"{empty[1].seconds:.2f} s with 1 worker (in process), {empty[2].seconds:.2f} s "
            f"({empty[2].cpu_seconds:.2f} CPU s) with 2 (forked)"
        )
    return {
        "baseline_tokens_per_second": base.tokens / base.seconds,
        "ours_1_worker_tokens_per_second": one.tokens / one.seconds,
        "ours_2_workers_tokens_per_second_per_worker": two.tokens / two.seconds / 2,
        "ours_1_worker_vs_baseline": ratio,
        "ours_1_worker_vs_baseline_cpu": cpu_best["baseline"] / cpu_best["ours 1"],
        "ours_2_workers_vs_baseline_cpu": cpu_best["baseline"] / cpu_best["ours 2"],
        "scaling_2_vs_1_workers": scaling,
        "empty_preparation_seconds": {str(w): m.seconds for w, m in empty.items()},
    }


def report_first_step(r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    whole, part = r["whole"], r["part"]
    ratio = whole["seconds"] / part["seconds"]
    print(
        f"\n2. Time to first step: one source of {r['files']} files, {r['bytes'] / 2**30:.2f} GiB, "
        f"{whole['shards_listed']} input shards of {r['shard_bytes'] / 2**20:g} MiB, "
        f"{whole['blocks_prepared']:,} blocks of {args.seq_length} tokens; 2 workers; first "
        f"global batch {args.global_batch} samples; the model's step is left out; load average "
        f"before and after: {' | '.join(r['load_average'])}\n"
    )
    print(
        "| run | samples | need (blocks) | need / source | shards prepared | blocks prepared"
        " | tokens | prepare s | to first batch s | whole / this | CPU s | whole / this (CPU) |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    sides = [("baseline: needs the whole source", whole), (f"ours: needs {args.need:.0%}", part)]
    for name, side in sides:
        share = min(side["need_blocks"], whole["blocks_prepared"]) / whole["blocks_prepared"]
        print(
            f"| {name} | {side['samples']:,} | {side['need_blocks']:,} | {share:.2%}"
            f" | {side['shards_prepared']} of {side['shards_listed']}"
            f" | {side['blocks_prepared']:,} | {side['tokens']:,}"
            f" | {side['prepare_seconds']:.1f} | {side['seconds']:.1f}"
            f" | {whole['seconds'] / side['seconds']:.1f}x | {side['cpu_seconds']:.1f}"
            f" | {whole['cpu_seconds'] / side['cpu_seconds']:.1f}x |"
        )
    # With equal shards, each side takes about ceil(its shards / workers) shard-times.
    bound = -(-whole["shards_prepared"] // 2) / -(-part["shards_prepared"] // 2)
    print(
        f"\ntime to first step, whole / {args.need:.0%}: {ratio:.1f}x (goal >= "
        f"{FIRST_STEP_GOAL:.0f}x: {'met' if ratio >= FIRST_STEP_GOAL else 'NOT MET'}); shard-times "
        f"on 2 workers, whole / {args.need:.0%}: {bound:.0f}x"
    )
    return {"first_step_whole_vs_part": ratio, "first_step_shard_time_bound": bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (< 1 min)")
    parser.add_argument(
        "--only", choices=["throughput", "first-step"], help="run one of the two parts"
    )
    parser.add_argument(
        "--throughput-mib", type=int, default=256, help="text for the tokens/s part (MiB)"
    )
    parser.add_argument("--source-gib", type=float, default=2.0, help="the large source (GiB)")
    parser.add_argument("--need", type=float, default=0.01, help="the run's share of the source")
    parser.add_argument("--seq-length", type=int, default=512, help="training.seqLength")
    parser.add_argument("--global-batch", type=int, default=512, help="samples in the first step")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds; best counts")
    parser.add_argument("--profile", action="store_true", help="also cProfile one shard")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--corpus", type=Path, help="keep the generated text here, and reuse what is there"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    # One process, one core, on both sides (the workers set it too).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.getLogger("chatflow.data.prepare").setLevel(logging.ERROR)  # "it repeats" warnings

    file_mib = 64
    if args.smoke:
        # The input shards shrink with the files, so that 1% is still a fraction of the shards.
        sources_module.SHARD_BYTES = 512 << 10
        file_mib, args.throughput_mib, args.source_gib = 1, 2, 8 / 1024
        args.seq_length, args.global_batch, args.rounds = 64, 16, 1
    file_bytes = file_mib << 20
    throughput_files = max(round(args.throughput_mib / file_mib), 1)
    source_files = max(round(args.source_gib * 1024 / file_mib), 1)
    files = max(throughput_files if args.only != "first-step" else 0, source_files)
    if args.only == "throughput":
        files = throughput_files

    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    info = machine()
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    profile = ""
    try:
        started = time.perf_counter()
        corpus = make_corpus(args.corpus or work / "corpus", files, file_bytes)
        print(
            f"{len(corpus)} files, {sum(f.stat().st_size for f in corpus) / 2**20:,.0f} MiB of "
            f"jsonl, made in {time.perf_counter() - started:.0f} s; load average {load()}",
            flush=True,
        )
        spec = None
        if args.only != "first-step":
            results["throughput"], spec = measure_throughput(args, corpus[:throughput_files], work)
        if args.only != "throughput":
            results["first_step"] = measure_first_step(args, corpus[:source_files], work)
        if args.profile and spec is not None:
            profile = profile_shard(spec, work, 25)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nMachine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; Python "
        f"{info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"tokenizers {info['tokenizers']}, datasets {info['datasets']}, numpy {info['numpy']}; "
        f"commit {info['commit']}"
    )
    summary: dict[str, Any] = {}
    if "throughput" in results:
        summary |= report_throughput(results["throughput"])
    if "first_step" in results:
        summary |= report_first_step(results["first_step"], args)
    results["summary"] = summary
    print(f"\nJSON: {json.dumps(results)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if profile:
        print(f"\n{profile}")


if __name__ == "__main__":
    main()
