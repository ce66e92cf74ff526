"""Training throughput and MFU on one device: the trainer's step against Hugging Face `Trainer`.

Both sides train the same randomly initialised LLaMA on the same random token batches, with the
DeepSpeed config the trainer generates from the spec (ZeRO-2, bf16, fused torch AdamW), the same
attention kernel and activation checkpointing, in one process each (world size 1), one after
another in the same run:
  ours      `chatflow.train.model.load_model` + `engine`, then `chatflow.train.step.train_step`
            per optimizer step: the trainer's hot path, without its data loader
  baseline  `transformers.Trainer` with `TrainingArguments(deepspeed=<the same config>)`
The timed window starts after `--warmup` steps and ends after `--steps` more, with the device
synchronised at both ends. tokens/s = steps x global batch x seq / seconds; MFU = tokens/s x the
FLOPs per token (`chatflow.train.metrics.flops_per_token`, torchtitan's count) / the device's
peak (`peak_flops_from_env`: H100 and H200 989 TFLOP/s dense bf16; CHATFLOW_PEAK_FLOPS overrides).

Default model: ~1.1B parameters (TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads,
MLP 5632, vocabulary 32,000), seq 2048, micro-batch 4, 2 micro-batches per step.
`--smoke`: a 2-layer model 64 wide, seq 64, fp32 on CPU, 2 + 2 steps, so that the tests run this
script and it cannot rot; its numbers mean nothing.

    .venv/bin/python benchmarks/gpu.py [--smoke] [--steps N] [--attention auto|sdpa|...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from random_llama import saved_llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "tiny.yaml"
SIDES = ("baseline", "ours")

MODELS = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "smoke": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
}


# --- one side, in its own process ---------------------------------------------------------------


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from chatflow.spec import parse_run
    from chatflow.train import distributed
    from chatflow.train.deepspeed_config import deepspeed_config
    from chatflow.train.metrics import flops_per_token, peak_flops_from_env

    place = distributed.init()
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["model"] = {"base": str(args.model)}
    document["spec"]["training"] |= {
        "seqLength": args.seq_length,
        "globalBatchSize": args.micro_batch * args.accumulation,
        "microBatchSize": args.micro_batch,
        "maxSteps": args.warmup + args.steps,
        "zeroStage": 2,
        "precision": args.precision,
        "attention": args.attention,
        "activationCheckpointing": args.activation_checkpointing,
        "compile": args.compile,
    }
    run = parse_run(document)
    config = deepspeed_config(run.spec.training, 1, args.precision)
    generator = torch.Generator().manual_seed(0)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    steps = [
        [
            torch.randint(0, vocab, (args.micro_batch, args.seq_length), generator=generator)
            for _ in range(args.accumulation)
        ]
        for _ in range(args.warmup + args.steps)
    ]
    train = ours if args.side == "ours" else baseline
    seconds, trained = train(run, config, steps, place, args)
    tokens = args.steps * args.accumulation * args.micro_batch * args.seq_length
    peak = peak_flops_from_env(args.precision)
    flops = flops_per_token(trained.config, args.seq_length)
    on_gpu = torch.cuda.is_available()
    return {
        "side": args.side,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "mfu": tokens / seconds * flops / peak if peak else None,
        "parameters": sum(p.numel() for p in trained.parameters()),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }


def ours(run: Any, config: dict, steps: list, place: Any, args: argparse.Namespace) -> tuple:
    import numpy as np
    import torch

    from chatflow.train import model
    from chatflow.train.data import StepBatches
    from chatflow.train.step import train_step

    loaded = model.load_model(run, EXAMPLE.parent, [], config)
    engine = model.engine(loaded, config, run.spec.training)
    engine.train()
    started = 0.0
    for number, micro_batches in enumerate(steps):
        if number == args.warmup:
            _synchronize()
            started = time.perf_counter()
        batches = StepBatches(
            [
                {
                    "input_ids": ids,
                    "labels": ids,
                    "source": torch.zeros(len(ids), dtype=torch.long),
                    "tokens": torch.full((len(ids),), args.seq_length),
                }
                for ids in micro_batches
            ],
            np.array([args.micro_batch * args.accumulation]),
            [],
        )
        train_step(engine, batches, run.spec.training.optimizer.lr, place, 1, False)
    _synchronize()
    return time.perf_counter() - started, engine.module


def baseline(run: Any, config: dict, steps: list, place: Any, args: argparse.Namespace) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from chatflow.train.model import attention

    training = run.spec.training
    loaded = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.float32,
        attn_implementation=attention(training.attention, torch.cuda.is_available()),
    )
    loaded.config.use_cache = False
    if training.activation_checkpointing:
        loaded.gradient_checkpointing_enable()
    window: dict[str, float] = {}

    class Window(TrainerCallback):
        def on_step_begin(self, arguments: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == args.warmup:
                _synchronize()
                window["started"] = time.perf_counter()

    optimizer = training.optimizer
    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.warmup + args.steps,
            learning_rate=optimizer.lr,
            adam_beta1=optimizer.betas[0],
            adam_beta2=optimizer.betas[1],
            adam_epsilon=1e-8,
            weight_decay=optimizer.weight_decay,
            max_grad_norm=optimizer.grad_clip,
            bf16=args.precision == "bf16",
            deepspeed=config,
            torch_compile=training.compile,
            logging_steps=10**9,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        # The same samples in the same order: one step's micro-batches, step after step.
        data = [
            {"input_ids": ids, "labels": ids}
            for micro_batches in steps
            for batch in micro_batches
            for ids in batch
        ]
        trainer = Trainer(model=loaded, args=arguments, train_dataset=data, callbacks=[Window()])
        trainer.train()
    _synchronize()
    return time.perf_counter() - window["started"], loaded


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- the driver ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(side: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One side in a process of its own (world size 1, as torchrun would set it up)."""
    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "result.json"
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", side]
        command += ["--model", str(model), "--result", str(result)]
        env = {
            **os.environ,
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1",
        }
        done = subprocess.run(command, env=env, capture_output=not args.verbose, text=True)
        if done.returncode:
            sys.exit(f"gpu.py: the {side} side failed:\n{(done.stderr or '')[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32 (tests)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides; best counts")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/chatflow-bench-gpu"))
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="show the sides' output")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq_length = 64 if args.smoke else 2048
    args.precision = "fp32" if args.smoke else "bf16"
    args.steps = args.steps or (2 if args.smoke else 10)
    if args.worker:
        args.side = args.worker
        args.result.write_text(json.dumps(worker(args)))
        return
    model = saved_llama(args.work, **MODELS["smoke" if args.smoke else "1b"])
    rounds = [[measure(side, model, args) for side in SIDES] for _ in range(args.rounds)]
    report(rounds, args)


def report(rounds: list[list[dict[str, Any]]], args: argparse.Namespace) -> None:
    best = {
        side: max((r[i] for r in rounds), key=lambda x: x["tokens_per_second"])
        for i, side in enumerate(SIDES)
    }
    first = best["ours"]
    print(
        f"{first['parameters'] / 1e9:.2f}B parameters, seq {args.seq_length}, micro-batch "
        f"{args.micro_batch} x {args.accumulation}, ZeRO-2 {args.precision}, attention "
        f"{args.attention}, on {first['device']}; {args.steps} timed steps after {args.warmup}\n"
    )
    print("| side | tokens/s | MFU | peak GPU memory GiB |")
    print("|---|--:|--:|--:|")
    for side in SIDES:
        b = best[side]
        mfu = f"{b['mfu']:.3f}" if b["mfu"] is not None else "-"
        memory = f"{b['peak_memory_gib']:.1f}" if b["peak_memory_gib"] is not None else "-"
        print(f"| {side} | {b['tokens_per_second']:,.0f} | {mfu} | {memory} |")
    ratio = first["tokens_per_second"] / best["baseline"]["tokens_per_second"]
    print(f"\nours / baseline tokens/s: {ratio:.2f}x (goal >= 1.0x; MFU goal >= 0.45 on H100/H200)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
