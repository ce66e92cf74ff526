"""The dynamic data sampler: which source every global sample index comes from.

The source of global sample n is a pure function of (seed, n, schedule): a low-discrepancy
(golden-ratio Weyl) sequence u_n in [0, 1) falls into one of the buckets that the target weights
at sample n lay out on [0, 1). Unlike Megatron's sequential "largest deficit" rule this needs no
history, so any rank or worker computes any slice of the sequence directly, vectorised, and the
realised fractions still track the target closely (a Weyl sequence's discrepancy over N samples
grows like log N).

A source's k-th sample is its k-th packed block (see `chatflow.data`), so the only state a run
carries is where it is: the next global index and how many samples each source has given so far
(its cursor). Cursors are saved rather than recomputed so a changed schedule continues each source
where it stopped. With that state, any number of ranks and dataloader workers continue the one
global sequence: consumer c of C takes the indices n >= next with (n - next) % C == c.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from chatflow.schedule import Schedule

# 2**64 / golden ratio, odd: u_n = (offset + n * STEP) mod 2**64 is exact in uint64 arithmetic
# (float64 would lose the fractional bits once n * 0.618 passes 2**30).
_STEP = np.uint64(0x9E3779B97F4A7C15)
_SCALE = 2.0**-64
CHUNK = 1 << 16  # indices planned per vectorised batch


@dataclass(frozen=True)
class Position:
    """Where a run is in the global sample sequence: all that resume needs."""

    next_sample: int
    cursors: tuple[int, ...]  # per source: samples drawn from it so far

    @classmethod
    def start(cls, num_sources: int) -> Position:
        return cls(0, (0,) * num_sources)

    def to_dict(self, sources: tuple[str, ...]) -> dict:
        return {
            "next_sample": self.next_sample,
            "cursors": dict(zip(sources, self.cursors, strict=True)),
        }

    @classmethod
    def from_dict(cls, state: dict, sources: tuple[str, ...]) -> Position:
        """Restore; sources added since the state was saved start at 0."""
        cursors = state["cursors"]
        return cls(int(state["next_sample"]), tuple(int(cursors.get(s, 0)) for s in sources))


@dataclass(frozen=True)
class Plan:
    """The sampler's decisions for a range of global indices."""

    indices: np.ndarray  # (N,) global sample indices
    sources: np.ndarray  # (N,) source index of each
    ordinals: np.ndarray  # (N,) how many earlier samples its source had given: its block ordinal


class MixtureSampler:
    def __init__(self, schedule: Schedule, seed: int) -> None:
        self.schedule = schedule
        rng = np.random.default_rng(seed)
        self._offset = rng.integers(0, 2**64, dtype=np.uint64)

    @property
    def num_sources(self) -> int:
        return len(self.schedule.sources)

    def sources_of(self, start: int, count: int) -> np.ndarray:
        """Source index of global samples start .. start+count-1 (int8 array)."""
        n = np.arange(start, start + count, dtype=np.uint64)
        with np.errstate(over="ignore"):  # uint64 wrap-around is the modulo we want
            u = (self._offset + n * _STEP).astype(np.float64) * _SCALE
        bounds = np.cumsum(self.schedule.weights_at(self.schedule.progress(n)), axis=-1)
        # A bucket of weight 0 has equal bounds and is never chosen; the last bound may round
        # just below 1, hence the clip.
        chosen = (u[:, None] >= bounds).sum(axis=1)
        return chosen.clip(max=self.num_sources - 1).astype(np.int8)

    def plan(self, position: Position, count: int) -> tuple[Plan, Position]:
        """Decide the next `count` samples after `position`; return them and the position after."""
        sources = self.sources_of(position.next_sample, count)
        onehot = np.zeros((count, self.num_sources), dtype=np.int64)
        onehot[np.arange(count), sources] = 1
        running = np.cumsum(onehot, axis=0)
        ordinals = np.asarray(position.cursors, dtype=np.int64)[sources]
        ordinals += running[np.arange(count), sources] - 1
        after = Position(
            position.next_sample + count,
            tuple(int(c) for c in np.asarray(position.cursors) + running[-1]),
        )
        indices = np.arange(position.next_sample, position.next_sample + count, dtype=np.int64)
        return Plan(indices, sources, ordinals), after

    def advance(self, position: Position, count: int) -> Position:
        """The position `count` samples later (planned in chunks, so any count fits in memory)."""
        end = position.next_sample + count
        while position.next_sample < end:
            _, position = self.plan(position, min(CHUNK * 16, end - position.next_sample))
        return position

    def stream(
        self, position: Position, consumer: int = 0, consumers: int = 1
    ) -> Iterator[tuple[int, int, int]]:
        """(global index, source, ordinal) for this consumer's share, in order, forever.

        Consumer c of C (e.g. rank * workers + worker) takes every C-th index from
        `position.next_sample` on, so the consumers together cover the sequence exactly once.
        """
        if not 0 <= consumer < consumers:
            raise ValueError(f"consumer {consumer} not in [0, {consumers})")
        chunk = max(CHUNK // consumers, 1) * consumers  # a multiple of C keeps the stride aligned
        while True:
            plan, position = self.plan(position, chunk)
            mine = slice(consumer, None, consumers)
            yield from zip(
                plan.indices[mine].tolist(),
                plan.sources[mine].tolist(),
                plan.ordinals[mine].tolist(),
                strict=True,
            )
