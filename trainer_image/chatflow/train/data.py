"""Each rank's share of the global mixture, as torch batches.

Rank r of W with K dataloader workers: worker w is consumer r + W*w of W*K. The DataLoader takes
one sample from each worker in turn, so the rank sees its indices in order (r, r+W, r+2W, ...), and
the W ranks' micro-batches of one optimizer step are exactly the global batch's indices.
"""

from __future__ import annotations

from collections.abc import Iterator

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
    return iter(DataLoader(shard, batch_size=micro_batch_size, num_workers=workers))
