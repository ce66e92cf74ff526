"""Data preparation: tokenize and pack each source's input shards, only as far as the run needs.

The need of a source is the samples the run takes from it in its first pass: where the sampler
leaves its cursor at the run's last sample (`chatflow schedule` shows it), counted from the newest
checkpoint's position when there is one, so that a changed schedule continues from where the run
is. Rounded up to whole shuffle windows and plus the held-out blocks, that is the blocks to
prepare; shards are prepared in order until their blocks cover it, or the source ends. A source
that ends first is prepared whole: its later passes repeat it, which `maxEpochs` may forbid
(an error before training starts) or which is reported as a warning.

A longer run, or another schedule, needs more: the next preparation adds the shards after the
prepared ones; nothing prepared changes, so nothing already trained on changes order.

Shards go to N worker processes in order; each is written atomically (see store.py), so a killed
preparation resumes at the first shard not written, and several preparations of one cache
(processes, pods) at once only duplicate work.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatflow.data.sources import InputShard, SourceError, input_shards
from chatflow.data.store import (
    PackedSource,
    blocks_needed,
    entry_directory,
    read_listing,
    read_shard_meta,
    remove_abandoned,
    write_listing,
    write_shard,
)
from chatflow.sampler import MixtureSampler, Position
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRunSpec, SourceSpec, SpecError

if TYPE_CHECKING:
    from chatflow.data.progress import Progress

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4  # a first guess of a shard's tokens from its size, until one is prepared


@dataclass
class SourcePlan:
    """One source's preparation: its shards, what the run needs of it, and what is done."""

    index: int  # in spec.data.sources
    source: SourceSpec
    entry: Path
    shards: list[InputShard]
    samples: int  # first-pass samples the run takes from it
    held_out: int
    seq_length: int
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard -> its counts

    @property
    def need(self) -> int:
        """Blocks to prepare: the held-out ones, then whole shuffle windows of samples."""
        return self.held_out + blocks_needed(self.samples)

    def expected_blocks(self) -> list[float]:
        """Blocks each shard gives: known when done, else estimated from its size."""
        read = sum(m["read_bytes"] for m in self.done.values())
        blocks = sum(m["blocks"] for m in self.done.values())
        per_byte = blocks / read if read and blocks else 1 / (BYTES_PER_TOKEN * self.seq_length)
        # A shard of unknown size (a hub shard): as many as the average done one; before any is
        # done, assume it covers the need, so that one is read at a time.
        per_shard = blocks / len(self.done) if self.done else self.need
        return [
            self.done[shard]["blocks"]
            if shard in self.done
            else (s.size * per_byte if s.size else per_shard)
            for shard, s in enumerate(self.shards)
        ]

    def next_shard(self, running: set[int]) -> int | None:
        """The next shard to start, or None while the done and running ones cover the need."""
        covered = 0.0
        for shard, blocks in enumerate(self.expected_blocks()):
            if covered >= self.need:
                return None
            if shard not in self.done and shard not in running:
                return shard
            covered += blocks
        return None

    @property
    def shards_needed(self) -> int:
        """Shards the need takes: exact once prepared, an estimate before."""
        covered = 0.0
        for shard, blocks in enumerate(self.expected_blocks()):
            if covered >= self.need:
                return shard
            covered += blocks
        return len(self.shards)

    @property
    def shards_done(self) -> int:
        needed = self.shards_needed
        return sum(1 for shard in self.done if shard < needed)


def needed_samples(spec: ChatFlowRunSpec, position: Position | None = None) -> list[int]:
    """Each source's cursor at the end of the run: the first-pass samples it must give."""
    sampler = MixtureSampler(Schedule.from_spec(spec), spec.training.seed)
    position = position or Position.start(sampler.num_sources)
    remaining = max(spec.training.total_samples - position.next_sample, 0)
    return list(sampler.advance(position, remaining).cursors)


def checkpoint_position(spec: ChatFlowRunSpec, output: Path) -> Position | None:
    """The sampler position of the run's newest checkpoint under `output`, if it has one."""
    from chatflow.train.checkpoint import Checkpoints

    latest = Checkpoints(output / "checkpoints").latest()
    if latest is None:
        return None
    return Checkpoints.state(latest[1], spec.source_names).position


def plan(
    spec: ChatFlowRunSpec,
    base_dir: Path,
    cache_dir: Path,
    tokenizer: Any,
    position: Position | None = None,
) -> list[SourcePlan]:
    """What to prepare of every source; reads the input listings and the cache, writes nothing."""
    plans = []
    for i, (source, samples) in enumerate(
        zip(spec.data.sources, needed_samples(spec, position), strict=True)
    ):
        try:
            entry = entry_directory(
                source, base_dir, cache_dir, tokenizer, spec.training.seq_length
            )
            shards = read_listing(entry) or input_shards(source, base_dir)
        except SourceError as e:
            raise _field_error(i, e) from None
        done = {s: m for s in range(len(shards)) if (m := read_shard_meta(entry, s)) is not None}
        plans.append(
            SourcePlan(
                i,
                source,
                entry,
                shards,
                samples,
                spec.training.eval.samples_per_source,
                spec.training.seq_length,
                done,
            )
        )
    return plans


def prepare(
    spec: ChatFlowRunSpec,
    base_dir: Path,
    cache_dir: Path,
    tokenizer: Any,
    *,
    workers: int = 1,
    position: Position | None = None,
    progress: Progress | None = None,
) -> list[PackedSource]:
    """Prepare what the run needs with `workers` processes; open every source."""
    plans = plan(spec, base_dir, cache_dir, tokenizer, position)
    for p in plans:
        write_listing(p.entry, p.shards)
        remove_abandoned(p.entry)
    on_shard = progress.shard_done if progress else None
    if progress:
        progress.start(plans)
    context = (tokenizer, base_dir, spec.training.seq_length)
    if all(p.next_shard(set()) is None for p in plans):
        pass  # everything the run needs is prepared
    elif workers == 1:
        _init_worker(*context)
        _schedule(plans, 1, _run_now, on_shard)
    else:
        # Forked workers start at once with the tokenizer in memory (spawned ones would import
        # transformers and torch again, seconds each). Forking is safe here: pools run in the
        # `chatflow prepare` and `chatflow train` command processes, before any process group
        # or dataloader threads exist; the tokenizer's own threads are off in the children.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; and no fork warning
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_pool_worker,
            initargs=(os.getpid(), *context),
        ) as pool:
            try:
                _schedule(plans, workers, lambda *task: pool.submit(_work, *task), on_shard)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    if progress:
        progress.finish()
    return [_checked(p, spec.training.seed) for p in plans]


def open_prepared(
    spec: ChatFlowRunSpec,
    base_dir: Path,
    cache_dir: Path,
    tokenizer: Any,
    position: Position | None = None,
) -> list[PackedSource]:
    """Open sources another step prepared; fail naming the first that does not cover the run."""
    packed = []
    for p in plan(spec, base_dir, cache_dir, tokenizer, position):
        source = _checked(p, spec.training.seed)
        if not source.covers(p.samples) or source.blocks < p.held_out:
            raise SpecError(
                f"spec.data.sources[{p.index}]: {p.source.name!r} is not prepared for this run "
                f"({source.num_blocks:,} samples prepared, {p.samples:,} needed; "
                f"is the cache {p.entry.parent} the one `chatflow prepare` wrote?)"
            )
        packed.append(source)
    return packed


def _schedule(
    plans: list[SourcePlan],
    workers: int,
    submit: Callable[..., Future],
    on_shard: Callable[[SourcePlan, int, dict[str, Any]], None] | None,
) -> None:
    """Keep `workers` shards in progress, in shard order, taking sources in turn."""
    running: dict[Future, tuple[SourcePlan, int]] = {}
    turn = 0
    while True:
        while len(running) < workers:
            task = None
            for k in range(len(plans)):
                p = plans[(turn + k) % len(plans)]
                busy = {shard for q, shard in running.values() if q is p}
                shard = p.next_shard(busy)
                if shard is not None:
                    task, turn = (p, shard), turn + k + 1
                    break
            if task is None:
                break
            p, shard = task
            running[submit(p.index, p.entry, p.source, shard, p.shards[shard])] = task
        if not running:
            return
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            p, shard = running.pop(future)
            try:
                p.done[shard] = future.result()
            except SourceError as e:
                raise _field_error(p.index, e) from None
            if on_shard:
                on_shard(p, shard, p.done[shard])


def _checked(p: SourcePlan, seed: int) -> PackedSource:
    """Open a prepared source; a source smaller than the run's need is an error or a warning."""
    source = PackedSource.open(p.source, p.entry, p.seq_length, seed, p.held_out)
    if not source.complete or not p.samples:
        return source
    field, blocks = f"spec.data.sources[{p.index}]", source.num_blocks
    if blocks == 0:
        raise SpecError(
            f"{field}.path: {source.blocks} packed samples are not enough to hold out "
            "training.eval.samplesPerSource and still train"
        )
    if p.samples > blocks:
        epochs, limit = p.samples / blocks, p.source.max_epochs
        repeats = (
            f"the run takes {p.samples:,} samples from {p.source.name!r}, which has {blocks:,}: "
            f"{epochs:.2f} epochs"
        )
        if limit is not None and epochs > limit:
            raise SpecError(f"{field}.maxEpochs: {repeats}, more than maxEpochs {limit:g}")
        log.warning("%s; it repeats", repeats)
    return source


def _field_error(index: int, error: SourceError) -> SpecError:
    return SpecError(f"spec.data.sources[{index}].{error.field}: {error.message}")


# --- the worker processes -------------------------------------------------------------------------

_context: tuple[Any, Path, int] | None = None
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def _init_worker(tokenizer: Any, base_dir: Path, seq_length: int) -> None:
    global _context
    _context = (tokenizer, base_dir, seq_length)


def _init_pool_worker(parent: int, *context: Any) -> None:
    """A forked worker dies with the process that started it, even by SIGKILL: outside a pod,
    where the container's end takes every process, nothing else would stop it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)
    _init_worker(*context)


def _work(
    index: int, entry: Path, source: SourceSpec, shard: int, input_shard: InputShard
) -> dict[str, Any]:
    assert _context is not None, "_init_worker runs first"
    tokenizer, base_dir, seq_length = _context
    return write_shard(entry, shard, input_shard, source, base_dir, tokenizer, seq_length)


def _run_now(*task: Any) -> Future:
    """`_work` in this process, as a finished future (one worker needs no pool)."""
    future: Future = Future()
    try:
        future.set_result(_work(*task))
    except Exception as e:
        future.set_exception(e)
    return future
