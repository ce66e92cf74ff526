"""The tiny example's training tokens/s on this machine, against bare forward+backward of its
model, and the data path's share of a step.

Training: the real main job, `chatflow train -f <tiny.yaml> --nproc 2`, on a copy of the example's
manifest with absolute asset paths and `metricsPort: 0`, as it is otherwise configured: ZeRO-2,
precision auto (resolved by the trainer for this machine: bf16 where the CPU has AMX or
AVX512_BF16, else fp32; its history's `precision` record says which; `--precision` overrides the
example's setting), 2 processes (gloo on CPU), micro-batch 4, 2 accumulation steps, global batch
16 x 128 tokens, held-out evaluation and a checkpoint every 20 steps. From `<output>/history.jsonl`:
  tokens/s   the step records' `tokens_per_second` (the step's real, non-padding tokens over its
             seconds, timed by the loop from the top of the step to the sampler's advance, so the
             data work it does inline, with no dataloader workers, is included): the median and
             the 10th and 90th percentiles over the steady state, the steps after the first
             `WARMUP`
  ms/step    the same steps' seconds, median: each step's real tokens (counted here from the same
             mixture, which is deterministic) over its tokens/s
  wall s     the whole command: preflight, start-up, steps, evaluations, checkpoints, final save
  CPU s      the command's processes, all their threads (rusage of the children)
The job runs `--runs` times on one data cache, warm; the table shows every run, and the best run
(highest median tokens/s) is the one whose step time the shares below are taken of.

Baseline, bare forward+backward: what the same hardware does with the same model and no trainer
around it. The trainer's model (the tiny LLaMA with its vocabulary extended, as `chatflow train`
builds it), in the precision the trainer resolved to, in plain torch: no DeepSpeed, no optimizer,
no gradient all-reduce, no data pipeline. 2 processes at once, each with the thread count `chatflow
train` gives its processes (OMP_NUM_THREADS = cores / 2, 1 here), each running forward (with the
loss) and backward on one micro-batch of random token ids of the trainer's shape (4 x 128),
`BARE_WARMUP` untimed iterations then `--bare-iterations` timed ones; the two processes' tokens/s
summed. It runs after each training job (interleaved, like the data-path timings) and the best
run counts. The ratio "trainer / bare forward+backward" compares the trainer's step time with
the time bare forward+backward takes for the same global batch (16 x 128 positions): both count
every position, padding included, since the bare batches have none and padding costs the same
compute; the trainer's real-token tokens/s is lower than its positions/s by the mixture's padding.

Data path, in this process alone: the same tokenizer, the same packed sources (from the same
cache) and the same Mixture (`chatflow.data.pipeline`), then, for as many optimizer steps as the
job ran, what one rank's loop does for data each step:
  loader     `next()` of `chatflow.train.data.loader(mixture, start, rank=0, world_size=2,
             micro_batch_size=4)`, once per accumulation step: plan, memmap reads, torch tensors,
             collation (the first step also starts the iterator and plans the first chunk)
  sampler    `MixtureSampler.advance(position, globalBatchSize)`: the loop's once-per-step advance
  both       the two together: the data work on a rank's critical path per step
Each is timed per step: the mean over the steps (what the job pays, the first step's start-up
included) and the median (a step in the steady state), each the best of `--repeats`. The named
baseline is the training step itself: each row's ms per step over the best run's median ms per
step, as a share.

    .venv/bin/python benchmarks/trainer.py [--quick] [--steps N] [--runs N] [--repeats N]
                                           [--precision P] [--bare-iterations N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import yaml

from chatflow.data.mixture import Mixture
from chatflow.data.pipeline import build_mixture, load_tokenizer, prepare_sources
from chatflow.sampler import Position
from chatflow.spec import load_run
from chatflow.train.data import loader
from chatflow.train.deepspeed_config import gradient_accumulation

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "tiny.yaml"
ASSETS = EXAMPLE.parent / "tiny-assets"
CHATFLOW = Path(sys.executable).with_name("chatflow")
PROCESSES = 2
WARMUP = 5  # step records left out of the steady state
BARE_WARMUP = 3  # untimed forward+backward iterations before the bare baseline's timed ones


@dataclass(frozen=True)
class Job:
    wall: float  # seconds, the whole command
    cpu: float  # seconds, the command's processes
    steps: int
    tokens_per_second: float  # median over the steady-state steps
    spread: tuple[float, float]  # their 10th and 90th percentiles
    ms_per_step: float  # median over the same steps
    first_loss: float
    last_loss: float
    precision: str  # what the trainer resolved spec.training.precision to
    precision_reason: str


def manifest(workdir: Path, steps: int | None, precision: str | None) -> Path:
    """A copy of the tiny example with absolute asset paths, no metrics port, `steps` and
    `precision` (None: the example's own)."""
    document = yaml.safe_load(EXAMPLE.read_text())
    spec = document["spec"]
    model = spec["model"]
    extend = model["extendVocab"]
    for holder, key in [(model, "base"), (model, "tokenizer"), (extend, "tokensFile")]:
        holder[key] = str(EXAMPLE.parent / holder[key])
    for source in spec["data"]["sources"]:
        source["path"] = str(EXAMPLE.parent / source["path"])
    spec["training"]["metricsPort"] = 0
    if steps is not None:
        spec["training"]["maxSteps"] = steps
    if precision is not None:
        spec["training"]["precision"] = precision
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return path


def first_steady(steps: int) -> int:
    """Index of the first step record of the steady state."""
    return WARMUP if steps > WARMUP + 1 else min(1, steps - 1)


def step_tokens(mixture: Mixture, batch: int, steps: int) -> list[int]:
    """Real tokens of each optimizer step's global batch, in order."""
    samples = mixture.samples(Position.start(len(mixture.sources)))
    return [sum(s.tokens for s in islice(samples, batch)) for _ in range(steps)]


def train(path: Path, workdir: Path, cache: Path, tokens: list[int], log: Path) -> Job:
    output = workdir / "output"
    shutil.rmtree(output, ignore_errors=True)
    command = [str(CHATFLOW), "train", "-f", str(path), "--output", str(output)]
    command += ["--cache-dir", str(cache), "--nproc", str(PROCESSES)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"`{' '.join(command)}` exited {done.returncode}; its output is in {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with (output / "history.jsonl").open() as f:
        history = [json.loads(line) for line in f]
    records = [r for r in history if r["event"] == "step"]
    precision = next(r for r in history if r["event"] == "precision")
    if [r["step"] for r in records] != list(range(1, len(tokens) + 1)):
        sys.exit(f"{output / 'history.jsonl'}: expected steps 1..{len(tokens)}")
    steady = records[first_steady(len(records)) :]
    seconds = [tokens[r["step"] - 1] / r["tokens_per_second"] for r in steady]
    rates = [r["tokens_per_second"] for r in steady]
    deciles = statistics.quantiles(rates, n=10) if len(rates) > 1 else rates
    return Job(
        wall=wall,
        cpu=cpu,
        steps=len(records),
        tokens_per_second=statistics.median(r["tokens_per_second"] for r in steady),
        spread=(deciles[0], deciles[-1]),
        ms_per_step=1000 * statistics.median(seconds),
        first_loss=records[0]["loss"],
        last_loss=records[-1]["loss"],
        precision=precision["precision"],
        precision_reason=precision["reason"],
    )


def bare(path: Path, precision: str, iterations: int) -> float:
    """Bare forward+backward tokens/s of `PROCESSES` processes at once (see the docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": threads_per_process()}
    command = [sys.executable, __file__, "--bare-worker", str(path), precision, str(iterations)]
    workers = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(PROCESSES)
    ]
    rates = []
    for worker in workers:
        out, err = worker.communicate()
        if worker.returncode != 0:
            sys.exit(f"bare forward+backward exited {worker.returncode}:\n{err}")
        rates.append(float(out))
    return sum(rates)


def threads_per_process() -> str:
    """OMP_NUM_THREADS as `chatflow train` sets it for each of its processes (train/launch.py)."""
    return os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // PROCESSES)))


def bare_worker(path: Path, precision: str, iterations: int) -> float:
    """One process of `bare`: its tokens/s over the timed iterations."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatflow.vocab import extend_embeddings

    run = load_run(path)
    training = run.spec.training
    # The trainer's model: the base with its vocabulary extended, in the resolved precision.
    _, new_tokens = load_tokenizer(run.spec, path.parent)
    model = AutoModelForCausalLM.from_pretrained(run.spec.model.base, dtype=torch.float32)
    extend_embeddings(model, new_tokens)
    model.config.use_cache = False
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32).train()
    shape = (training.micro_batch_size, training.seq_length)
    ids = torch.randint(model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    for i in range(BARE_WARMUP + iterations):
        if i == BARE_WARMUP:
            started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    return iterations * ids.numel() / (time.perf_counter() - started)


def time_data(mixture: Mixture, steps: int, batch: int, micro: int, accumulation: int) -> dict:
    """Seconds of each step of `steps`, for "loader", "sampler" and "both" (see the docstring)."""
    start = Position.start(len(mixture.sources))
    advance = mixture.sampler.advance
    clock = time.perf_counter
    times: dict[str, list[float]] = {"loader": [], "sampler": [], "both": []}

    def lap(laps: list[float], began: float) -> float:
        now = clock()
        laps.append(now - began)
        return now

    began = clock()  # the iterator's start counts towards the first step, as in the loop
    batches = loader(mixture, start, 0, PROCESSES, micro)
    for _ in range(steps):
        for _ in range(accumulation):
            next(batches)
        began = lap(times["loader"], began)

    position = start
    began = clock()
    for _ in range(steps):
        position = advance(position, batch)
        began = lap(times["sampler"], began)

    began = clock()
    batches, position = loader(mixture, start, 0, PROCESSES, micro), start
    for _ in range(steps):
        for _ in range(accumulation):
            next(batches)
        position = advance(position, batch)
        began = lap(times["both"], began)
    return times


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="10 steps, 1 run, 1 repeat, 5 bare iterations (smoke)"
    )
    parser.add_argument("--steps", type=int, help="override training.maxSteps (example: 60)")
    parser.add_argument("--runs", type=int, default=2, help="training jobs; the best counts")
    parser.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], help="override training.precision"
    )
    parser.add_argument("--repeats", type=int, default=5, help="data-path timings; best counts")
    parser.add_argument(
        "--bare-iterations", type=int, help="timed iterations of the bare baseline (default 20)"
    )
    # One process of the bare baseline: manifest, precision, iterations (`bare` starts them).
    parser.add_argument("--bare-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        path, precision, iterations = args.bare_worker
        print(bare_worker(Path(path), precision, int(iterations)))
        return
    steps = args.steps or (10 if args.quick else None)
    bare_iterations = args.bare_iterations or (5 if args.quick else 20)
    runs = 1 if args.quick else max(args.runs, 1)
    repeats = 1 if args.quick else max(args.repeats, 1)
    if not (ASSETS / "model").is_dir():
        subprocess.run([str(CHATFLOW), "example", "tiny"], check=True, cwd=ROOT)

    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="chatflow-bench-") as tmp:
        workdir = Path(tmp)
        path = manifest(workdir, steps, args.precision)
        run = load_run(path)
        spec, training = run.spec, run.spec.training
        total_steps = training.total_steps
        batch, micro = training.global_batch_size, training.micro_batch_size
        accumulation = gradient_accumulation(training, PROCESSES)

        # The data, prepared once (cold) into the cache the training jobs then find warm.
        cache = workdir / "cache"
        tokenizer, _ = load_tokenizer(spec, path.parent)
        began = time.perf_counter()
        sources = prepare_sources(spec, path.parent, cache, tokenizer)
        prepare_s = time.perf_counter() - began
        mixture = build_mixture(spec, sources)
        tokens = step_tokens(mixture, batch, total_steps)

        timings: list[dict[str, Any]] = []
        jobs: list[Job] = []
        bares: list[float] = []
        for i in range(max(runs, repeats)):  # interleaved, so a busy spell hits both sides
            if i < repeats:
                timings.append(time_data(mixture, total_steps, batch, micro, accumulation))
            if i < runs:
                jobs.append(train(path, workdir, cache, tokens, workdir / f"train-{i}.log"))
                bares.append(bare(path, jobs[-1].precision, bare_iterations))
                loads.append(load_average())
    # Best of the repeats: the lowest mean (total over the steps / steps) and the lowest median.
    mean = {key: min(statistics.fmean(t[key]) for t in timings) for key in timings[0]}
    median = {key: min(statistics.median(t[key]) for t in timings) for key in timings[0]}
    first = min(t["both"][0] for t in timings)
    best = max(jobs, key=lambda j: j.tokens_per_second)
    step_ms = best.ms_per_step
    best_bare = max(bares)
    positions = batch * training.seq_length  # per optimizer step

    print(
        f"tiny example, {total_steps} steps x {batch} x {training.seq_length} tokens, "
        f"ZeRO-{training.zero_stage}, precision {training.precision} → {best.precision} "
        f"({best.precision_reason}), {PROCESSES} processes; "
        f"steady state = steps {first_steady(total_steps) + 1}-{total_steps}; "
        f"load average before and after each run: {' | '.join(loads)}\n"
    )
    print(
        "| training job | steps | wall s | CPU s | tokens/s (median) | tokens/s p10-p90"
        " | ms/step (median) | loss |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for i, job in enumerate(jobs, 1):
        mark = " (best)" if job is best and len(jobs) > 1 else ""
        print(
            f"| run {i}{mark} | {job.steps} | {job.wall:.1f} | {job.cpu:.1f}"
            f" | {job.tokens_per_second:,.0f} | {job.spread[0]:,.0f}-{job.spread[1]:,.0f}"
            f" | {job.ms_per_step:,.0f}"
            f" | {job.first_loss:.2f} → {job.last_loss:.2f} |"
        )
    print(
        f"\nBaseline: bare forward+backward of the same model in {best.precision}, {PROCESSES} "
        f"processes at once (OMP_NUM_THREADS={threads_per_process()} each), micro-batch {micro} x "
        f"{training.seq_length} random token ids, {BARE_WARMUP} warm-up + {bare_iterations} "
        f"timed iterations, after each training job; positions/s count every position of a "
        f"batch, padding included\n"
    )
    print("| | positions/s | ms per global batch | trainer / bare forward+backward |")
    print("|---|--:|--:|--:|")
    for i, rate in enumerate(bares, 1):
        ratio = "1x" if rate == best_bare else ""
        mark = " (best)" if ratio and len(bares) > 1 else ""
        ms = 1000 * positions / rate
        print(f"| bare forward+backward, after run {i}{mark} | {rate:,.0f} | {ms:,.0f} | {ratio} |")
    for i, job in enumerate(jobs, 1):
        mark = " (best)" if job is best and len(jobs) > 1 else ""
        rate = 1000 * positions / job.ms_per_step
        print(
            f"| training job, run {i}{mark} | {rate:,.0f} | {job.ms_per_step:,.0f}"
            f" | {rate / best_bare:.2f}x |"
        )
    print(
        f"\ntrainer / bare forward+backward: {1000 * positions / step_ms / best_bare:.2f}x "
        f"(the best run's median step against the best bare run; goal >= 0.7x)"
    )
    print(
        f"\nData path in one process, {total_steps} steps of rank 0's share "
        f"({accumulation} x {micro} samples) and one {batch}-sample advance; best of {repeats}; "
        f"cold preparation of the sources (once, not per step) {prepare_s:.2f} s; "
        f"first step of the loop's data work (iterator start, first plan chunk) "
        f"{1000 * first:.2f} ms\n"
    )
    print("| per optimizer step | mean ms | median ms | share: mean | share: median |")
    print("|---|--:|--:|--:|--:|")
    print(f"| baseline: training step (best run) | | {step_ms:,.1f} | | 1x |")
    names = {
        "loader": f"data path: `loader`, {accumulation} micro-batches",
        "sampler": f"sampler alone: `advance` by {batch}",
        "both": "data path + sampler (the loop's data work)",
    }
    for key, name in names.items():
        ms, mid = 1000 * mean[key], 1000 * median[key]
        print(
            f"| {name} | {ms:.3f} | {mid:.3f} | {100 * ms / step_ms:.3f}%"
            f" | {100 * mid / step_ms:.3f}% |"
        )


if __name__ == "__main__":
    main()
