"""The global mixture: the sampler's decisions turned into training samples."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from chatflow.data.store import PackedSource, SourceExhausted
from chatflow.sampler import MixtureSampler, Position


@dataclass(frozen=True)
class Sample:
    index: int  # global sample index
    source: int  # index into the run's sources
    ordinal: int  # how many samples its source had given before this one
    block: int  # which of the source's packed blocks
    input_ids: np.ndarray  # (seqLength,) int64
    labels: np.ndarray  # (seqLength,) int64; IGNORE_INDEX (-100) where the mask is 0
    tokens: int  # real (non-padding) tokens


class Mixture:
    """Samples of the global sequence, for any consumer's share, from any position."""

    def __init__(self, sampler: MixtureSampler, sources: list[PackedSource]) -> None:
        if [s.name for s in sources] != list(sampler.schedule.sources):
            raise ValueError("sources must be in the schedule's order")
        self.sampler = sampler
        self.sources = sources

    def sample(self, index: int, source: int, ordinal: int) -> Sample:
        packed = self.sources[source]
        try:
            block = packed.block_of(ordinal)
        except SourceExhausted as e:
            raise SourceExhausted(f"{e} (at global sample {index})") from None
        return Sample(index, source, ordinal, block, *packed.example(block))

    def samples(
        self, position: Position, consumer: int = 0, consumers: int = 1
    ) -> Iterator[Sample]:
        """This consumer's share of the global sequence from `position` on (see MixtureSampler)."""
        for index, source, ordinal in self.sampler.stream(position, consumer, consumers):
            yield self.sample(index, source, ordinal)
