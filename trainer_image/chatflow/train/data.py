"""Each rank's share of the global mixture, as torch batches.

Rank r of W with K dataloader workers: worker w is consumer r + W*w of W*K. The DataLoader takes
one sample from each worker in turn, so the rank sees its indices in order (r, r+W, r+2W, ...), and
the W ranks' micro-batches of one optimizer step are exactly the global batch's indices.

`StepLoader` hands them out an optimizer step at a time and owns the sampler `Position`: where
the run stands, which a checkpoint saves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from chatflow.data.mixture import Mixture
from chatflow.sampler import Position


class MixtureShard(IterableDataset):
    def __init__(self, mixture: Mixture, position: Position, rank: int, world_size: int) -> None:
        self.mixture = mixture
        self.position = position
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        consumer = self.rank + self.world_size * worker_id
        for sample in self.mixture.samples(self.position, consumer, self.world_size * workers):
            yield {
                "input_ids": torch.from_numpy(sample.input_ids),
                "labels": torch.from_numpy(sample.labels),
                "index": torch.tensor(sample.index),
                "source": torch.tensor(sample.source),
                "tokens": torch.tensor(sample.tokens),
            }


def loader(
    mixture: Mixture,
    position: Position,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of this rank's share, from `position` on."""
    shard = MixtureShard(mixture, position, rank, world_size)
    # Pinned host memory lets the copy to the GPU run asynchronously (`non_blocking=True`).
    pin = torch.cuda.is_available()
    return iter(DataLoader(shard, batch_size=micro_batch_size, num_workers=workers, pin_memory=pin))


@dataclass(frozen=True)
class StepBatches:
    """One optimizer step's data on this rank."""

    micro_batches: list[dict[str, torch.Tensor]]
    samples: np.ndarray  # samples of the whole global batch per source (the same on every rank)
    indices: list[int]  # the global sample indices of this rank's micro-batches


class StepLoader:
    """This rank's micro-batches, one optimizer step's worth at a time, from `position` on."""

    def __init__(
        self,
        mixture: Mixture,
        position: Position,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        accumulation: int,
    ) -> None:
        self.mixture = mixture
        self.position = position  # after the last step handed out
        self.accumulation = accumulation
        self.global_batch_size = micro_batch_size * accumulation * world_size
        self._batches = loader(mixture, position, rank, world_size, micro_batch_size)

    def next_step(self) -> StepBatches:
        micro_batches = [next(self._batches) for _ in range(self.accumulation)]
        before = self.position
        self.position = self.mixture.sampler.advance(before, self.global_batch_size)
        return StepBatches(
            micro_batches,
            np.subtract(self.position.cursors, before.cursors),
            [i for batch in micro_batches for i in batch["index"].tolist()],
        )
