"""One optimizer step, and the held-out evaluation: what the DeepSpeed engine does with the data.

A training step runs this rank's micro-batches forward and backward and sums its loss on the
device, so nothing waits for the device between micro-batches; then one all-reduce brings the
step's loss, tokens per source and stop requests to every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chatflow.data.mixture import Mixture
from chatflow.train import distributed
from chatflow.train.data import StepBatches


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, over all ranks."""

    loss: float  # mean over the global batch's target tokens
    lr: float
    grad_norm: float | None  # before clipping; None where DeepSpeed does not compute it
    samples: np.ndarray  # per source
    tokens: np.ndarray  # per source
    seconds: float
    stop: bool  # some rank got SIGTERM: checkpoint now and exit

    @property
    def tokens_per_second(self) -> float:
        return float(self.tokens.sum()) / self.seconds


def train_step(
    engine: Any,
    data: StepBatches,
    lr: float,
    place: distributed.Place,
    num_sources: int,
    stop_requested: bool,
) -> StepResult:
    started = time.perf_counter()
    accumulation = len(data.micro_batches)
    # The loss is a mean over the global batch's target tokens, not a mean of micro-batch means:
    # the gradient then does not depend on how samples are grouped into micro-batches and ranks,
    # so a run resumed on another number of processes follows the same curve.
    targets = sum(int((b["labels"][:, 1:] >= 0).sum()) for b in data.micro_batches)
    global_targets = distributed.all_sum(torch.tensor([targets]))[0].to(place.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=place.device)
    tokens = torch.zeros(num_sources, dtype=torch.float64)
    for batch in data.micro_batches:
        loss = engine(
            input_ids=batch["input_ids"].to(place.device, non_blocking=True),
            labels=batch["labels"].to(place.device, non_blocking=True),
            num_items_in_batch=global_targets,
        ).loss
        # DeepSpeed divides by the accumulation steps and averages over ranks: undo both.
        engine.backward(loss * accumulation * place.world_size)
        engine.step()
        loss_sum += loss.detach().double()
        tokens += torch.bincount(
            batch["source"], weights=batch["tokens"].double(), minlength=num_sources
        )
    local = torch.cat([loss_sum.cpu()[None], tokens, torch.tensor([float(stop_requested)])])
    total = distributed.all_sum(local)
    norm = engine.get_global_grad_norm()
    return StepResult(
        loss=float(total[0]),
        lr=lr,
        grad_norm=None if norm is None else float(norm),
        samples=data.samples,
        tokens=total[1:-1].numpy().astype(np.int64),
        seconds=time.perf_counter() - started,
        stop=bool(total[-1] > 0),
    )


def evaluate(engine: Any, mixture: Mixture, place: distributed.Place) -> dict[int, float]:
    """Mean loss per target token on each source's held-out blocks, over all ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively); a
    rank without a block of its own repeats one with weight 0.
    """
    engine.eval()
    losses = {}
    with torch.no_grad():
        for k, packed in enumerate(mixture.sources):
            blocks = list(packed.held_out_blocks)
            if not blocks:
                continue
            sums = torch.zeros(2, dtype=torch.float64, device=place.device)
            for first in range(0, len(blocks), place.world_size):
                index = first + place.rank
                weight = 1.0 if index < len(blocks) else 0.0
                input_ids, labels, _ = packed.example(blocks[min(index, len(blocks) - 1)])
                labels = torch.from_numpy(labels)[None].to(place.device)
                loss = engine(
                    input_ids=torch.from_numpy(input_ids)[None].to(place.device), labels=labels
                ).loss
                targets = (labels[:, 1:] >= 0).sum().double() * weight
                sums += torch.stack([loss.double() * targets, targets])
            total = distributed.all_sum(sums)
            if total[1] > 0:
                losses[k] = float(total[0] / total[1])
    engine.train()
    return losses
