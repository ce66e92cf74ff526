"""Host memory per rank to load a model under ZeRO-3 and take the first step: partitioned loading
(the trainer's `chatflow.train.model.load_model`) against loading the whole model on every rank.

Model: a randomly initialised LLaMA (`--hidden`, `--layers`, ...; by default 0.55B parameters,
vocabulary 32,000), saved once with `save_pretrained` in bf16 safetensors, as LLaMA-2's checkpoints
are stored in half precision, under `--work` (kept and reused across runs).

Both sides run the same 2-rank job under torchrun (gloo on CPU), the trainer's generated DeepSpeed
config with ZeRO-3 in fp32, and one optimizer step on a batch of random token ids
(`--seq-length`, micro-batch 1):
  baseline  today's path before partitioned loading: every rank calls
            `AutoModelForCausalLM.from_pretrained(path, dtype=float32)` (the whole model in its own
            memory), then `deepspeed.initialize` partitions it
  ours      `load_model`: transformers builds the model inside `zero.Init` (HfDeepSpeedConfig) and
            rank 0 alone reads the checkpoint, a tensor at a time; then the same `engine`
Each rank samples its own /proc/self/status every 5 ms: the peak of VmRSS (all its resident
memory, including the pages of a memory-mapped checkpoint it has read, which are page cache that
the kernel shares and can drop) and of RssAnon (memory that is the rank's alone), over the load
(up to a ready engine) and over the first step. The ratio is ours / baseline for the rank with
the higher peak. `--rounds` alternate the two sides; the lowest peak of each counts.

    .venv/bin/python benchmarks/zero3_load.py [--rounds N] [--hidden H --layers L ...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from random_llama import saved_llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "tiny.yaml"
SIDES = ("baseline", "ours")
PHASES = ("load", "engine", "step")


# --- the worker: one rank -----------------------------------------------------------------------


class Sampler(threading.Thread):
    """Peaks of this process's VmRSS and RssAnon (bytes), per phase."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "load"
        self.peaks = {p: {"VmRSS": 0, "RssAnon": 0} for p in PHASES}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            time.sleep(0.005)

    def sample(self) -> None:
        peaks = self.peaks[self.phase]
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from chatflow.spec import parse_run
    from chatflow.train import distributed, model
    from chatflow.train.deepspeed_config import deepspeed_config

    sampler = Sampler()
    sampler.start()
    place = distributed.init()
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["model"] = {"base": str(args.model)}
    document["spec"]["training"] |= {
        "seqLength": args.seq_length,
        "globalBatchSize": place.world_size,
        "microBatchSize": 1,
        "zeroStage": 3,
        "precision": "fp32",
    }
    run = parse_run(document)
    config = deepspeed_config(run.spec.training, place.world_size, "fp32")
    started = time.perf_counter()
    if args.side == "ours":
        loaded = model.load_model(run, EXAMPLE.parent, [], config)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        loaded.config.use_cache = False
    distributed.barrier()
    load_seconds = time.perf_counter() - started
    sampler.sample()
    sampler.phase = "engine"
    engine = model.engine(loaded, config, run.spec.training)
    distributed.barrier()
    sampler.sample()
    sampler.phase = "step"
    torch.manual_seed(place.rank)
    ids = torch.randint(0, engine.module.config.vocab_size, (1, args.seq_length))
    started = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    distributed.barrier()
    step_seconds = time.perf_counter() - started
    sampler.sample()
    sampler.stopped.set()
    result = {
        "rank": place.rank,
        "peaks": sampler.peaks,
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "loss": float(loss),
        "parameters": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()
        ),
    }
    (args.out / f"rank-{place.rank}.json").write_text(json.dumps(result))


# --- the driver ---------------------------------------------------------------------------------


def make_model(args: argparse.Namespace) -> Path:
    return saved_llama(
        args.work,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )


def run_side(side: str, model: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(args.ranks), __file__, "--worker", "--side", side]
        command += ["--model", str(model), "--out", out, "--seq-length", str(args.seq_length)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, env=env, capture_output=not args.verbose, text=True)
        if done.returncode:
            sys.exit(f"zero3_load.py: the {side} side failed:\n{(done.stderr or '')[-4000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/chatflow-bench-zero3"))
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args)
    results: dict[str, list[list[dict[str, Any]]]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            results[side].append(run_side(side, model, args))
    report(results, model, args)


def report(results: dict[str, Any], model: Path, args: argparse.Namespace) -> None:
    params = results["ours"][0][0]["parameters"]
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(
        f"model: {params / 1e9:.2f}B parameters ({gib(4 * params)} GiB in fp32; checkpoint "
        f"{gib(size)} GiB bf16), {args.ranks} ranks, ZeRO-3 fp32, seq {args.seq_length}\n"
    )
    peaks = [f"peak {key} {phase}" for key in ("VmRSS", "RssAnon") for phase in PHASES]
    print("| side | rank | load s | step s | " + " | ".join(peaks) + " |")
    print("|---|--:|--:|--:|" + "--:|" * len(peaks))
    best: dict[str, dict[str, float]] = {}
    for side in SIDES:
        for rank in range(args.ranks):
            rounds = [r[rank] for r in results[side]]
            row = {
                f"{key} {phase}": min(r["peaks"][phase][key] for r in rounds)
                for key in ("VmRSS", "RssAnon")
                for phase in PHASES
            }
            for name, value in row.items():
                best.setdefault(side, {})[name] = max(best.get(side, {}).get(name, 0), value)
            load_s = min(r["load_seconds"] for r in rounds)
            step_s = min(r["step_seconds"] for r in rounds)
            print(
                f"| {side} | {rank} | {load_s:.1f} | {step_s:.1f} | "
                + " | ".join(gib(row[f"{k} {p}"]) for k in ("VmRSS", "RssAnon") for p in PHASES)
                + " |"
            )
    print("\nours / baseline, the higher rank's peak (GiB):")
    ratios = {}
    for name in best["ours"]:
        ratios[name] = best["ours"][name] / best["baseline"][name]
        print(
            f"  {name}: {gib(best['ours'][name])} / {gib(best['baseline'][name])} = "
            f"{ratios[name]:.2f}x"
        )
    both = {s: max(best[s][f"VmRSS {p}"] for p in PHASES) for s in SIDES}
    print(
        f"  peak VmRSS over load and first step: {both['ours'] / both['baseline']:.2f}x "
        "(goal <= 0.6x)"
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
