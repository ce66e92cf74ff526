"""Sampler decisions per second: `MixtureSampler` against two named baselines, in one run.

Workload: a ChatFlow-like 5-source linear schedule (English and parallel text first, Chinese and
instructions later) with growth 5,000,000 samples; the measured ranges cross the end of the growth.

Ours:
  sources_of  the source of every index of a large range, vectorised (what planning tools use)
  plan        `plan()` in the chunk size `stream()` uses, ordinals included
  stream      `stream()` consumed one item at a time by one consumer (a dataloader worker's view)
Baselines, with the schedule's start weights held static:
  Megatron    the sequential "largest deficit" rule, argmax of w * (n + 1) - taken, in plain Python
  numpy       `Generator.choice(K, size, p=w)`: i.i.d. sampling, the vectorised floor

Each figure is the best of `--repeats` runs.

    .venv/bin/python benchmarks/sampler.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from itertools import islice

import numpy as np

from chatflow.sampler import CHUNK, MixtureSampler, Position
from chatflow.schedule import Schedule

SOURCES = ("en-web", "zh-web", "zh-en", "sft", "chat")
START = (0.5, 0.2, 0.3, 0.0, 0.0)
END = (0.1, 0.3, 0.1, 0.25, 0.25)
GROWTH = 5_000_000
GOAL = 1_000_000  # decisions/s
RANGE = 1 << 20  # indices per `sources_of` call
MEGATRON = "baseline: Megatron largest deficit, Python loop"
NUMPY = "baseline: numpy `Generator.choice`, i.i.d."


def chatflow_schedule() -> Schedule:
    return Schedule(
        sources=SOURCES,
        curve="linear",
        knots=np.array([0.0, GROWTH]),
        weights=np.array([START, END]),
        phases=("growth", "final"),
        tokens_per_sample=1,
    )


def measure(decide: Callable[[], int], repeats: int) -> tuple[int, float]:
    """(decisions, best decisions/s) over `repeats` calls of `decide`, which returns its count."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        decisions = decide()
        best = max(best, decisions / (time.perf_counter() - start))
    return decisions, best


def sources_of(sampler: MixtureSampler, total: int) -> int:
    for start in range(0, total, RANGE):
        sampler.sources_of(start, RANGE)
    return total


def plan(sampler: MixtureSampler, total: int) -> int:
    position = Position.start(sampler.num_sources)
    for _ in range(total // CHUNK):
        _, position = sampler.plan(position, CHUNK)
    return total // CHUNK * CHUNK


def stream(sampler: MixtureSampler, total: int) -> int:
    for _index, _source, _ordinal in islice(
        sampler.stream(Position.start(sampler.num_sources)), total
    ):
        pass
    return total


def largest_deficit(weights: tuple[float, ...], total: int) -> int:
    """Megatron's blending rule: each sample goes to the source furthest behind its share."""
    taken = [0] * len(weights)
    for n in range(total):
        deficits = [w * (n + 1) - t for w, t in zip(weights, taken, strict=True)]
        taken[deficits.index(max(deficits))] += 1
    return total


def numpy_choice(weights: tuple[float, ...], total: int) -> int:
    rng = np.random.default_rng(0)
    for _ in range(total // RANGE):
        rng.choice(len(weights), size=RANGE, p=weights)
    return total // RANGE * RANGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best counts")
    args = parser.parse_args()
    vectorised, items, loop = (
        (2 * RANGE, CHUNK * 4, 20_000) if args.quick else (8 * RANGE, 1 << 21, 300_000)
    )
    repeats = 1 if args.quick else max(args.repeats, 1)

    sampler = MixtureSampler(chatflow_schedule(), seed=0)
    methods: dict[str, Callable[[], int]] = {
        "ours: `sources_of`, 2^20-index ranges": lambda: sources_of(sampler, vectorised),
        f"ours: `plan`, {CHUNK:,}-index chunks": lambda: plan(sampler, vectorised),
        "ours: `stream`, per item, 1 consumer": lambda: stream(sampler, items),
        MEGATRON: lambda: largest_deficit(START, loop),
        NUMPY: lambda: numpy_choice(START, vectorised),
    }
    results = {name: measure(decide, repeats) for name, decide in methods.items()}

    print(f"{len(SOURCES)} sources, linear growth over {GROWTH:,} samples; best of {repeats}\n")
    print("| method | decisions | decisions/s | vs Megatron loop | vs numpy choice | goal 1M/s |")
    print("|---|--:|--:|--:|--:|:-:|")
    for name, (decisions, rate) in results.items():
        goal = ("met" if rate >= GOAL else "**not met**") if name.startswith("ours") else ""
        print(
            f"| {name} | {decisions:,} | {rate:,.0f} | {rate / results[MEGATRON][1]:.1f}x"
            f" | {rate / results[NUMPY][1]:.2f}x | {goal} |"
        )


if __name__ == "__main__":
    main()
