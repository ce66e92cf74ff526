"""A run's planned mixture, before it runs: what `chatflow schedule` shows.

One vectorised pass of the sampler over the whole run gives, per source, how many samples it will
give, where it would pass its `maxEpochs`, and the realised mixture in windows, to compare with
the target curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chatflow.sampler import CHUNK, MixtureSampler, Position


@dataclass(frozen=True)
class SourceUsage:
    name: str
    planned: int  # samples the run takes from it
    available: int | None  # its packed samples (one epoch); None when not read, or read in part
    max_epochs: float | None
    exhausted_at: int | None  # global sample at which it would pass maxEpochs, if it does

    @property
    def epochs(self) -> float | None:
        return None if not self.available else self.planned / self.available

    @property
    def warning(self) -> str | None:
        if self.available == 0:
            return f"source {self.name!r} has no data"
        if self.exhausted_at is not None:
            return (
                f"source {self.name!r} passes maxEpochs {self.max_epochs:g} at global sample "
                f"{self.exhausted_at:,}: the run would stop there"
            )
        if self.epochs is not None and self.epochs > 1:
            return f"source {self.name!r} repeats: {self.epochs:.2f} epochs over the run"
        return None


@dataclass(frozen=True)
class Survey:
    usage: list[SourceUsage]
    window: int  # samples per window of `realised`
    window_starts: np.ndarray  # (W,) first global sample of each window
    realised: np.ndarray  # (W, K) fraction of each window's samples from each source


def survey(
    sampler: MixtureSampler,
    total: int,
    available: list[int | None] | None = None,
    max_epochs: list[float | None] | None = None,
    windows: int = 100,
    min_window: int = 64,
) -> Survey:
    """Run the sampler over samples 0..total-1 (in chunks) and summarise it.

    Realised fractions are measured in up to `windows` windows of at least `min_window` samples:
    smaller windows show quantisation (1/size), not the sampler.
    """
    k = sampler.num_sources
    limits = np.full(k, np.inf)
    if available is not None and max_epochs is not None:
        limits = np.array(
            [
                np.inf if m is None or a is None else m * a
                for a, m in zip(available, max_epochs, strict=True)
            ]
        )
    window = max(total // windows, min_window)
    counts = np.zeros((-(-total // window), k), dtype=np.int64)
    exhausted_at = np.full(k, -1, dtype=np.int64)
    position = Position.start(k)
    while position.next_sample < total:
        plan, position = sampler.plan(position, min(CHUNK * 16, total - position.next_sample))
        np.add.at(counts, (plan.indices // window, plan.sources), 1)
        over = plan.ordinals >= limits[plan.sources]
        for source in np.unique(plan.sources[over]):
            if exhausted_at[source] < 0:
                exhausted_at[source] = plan.indices[over & (plan.sources == source)][0]
    usage = [
        SourceUsage(
            name=name,
            planned=position.cursors[i],
            available=None if available is None else available[i],
            max_epochs=None if max_epochs is None else max_epochs[i],
            exhausted_at=None if exhausted_at[i] < 0 else int(exhausted_at[i]),
        )
        for i, name in enumerate(sampler.schedule.sources)
    ]
    sizes = counts.sum(axis=1, keepdims=True)
    return Survey(usage, window, np.arange(len(counts)) * window, counts / np.maximum(sizes, 1))
