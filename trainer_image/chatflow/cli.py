"""`chatflow`: the command line.

    chatflow example tiny            build the bundled tiny example's assets (offline)
    chatflow schedule -f RUN.yaml    the planned mixture over the run, with warnings
    chatflow sample -f RUN.yaml      which source each global sample index comes from
    chatflow train -f RUN.yaml       train on this machine (torchrun, one process per device)
    chatflow report --history FILE   plot a run's mixture and held-out loss (or --prometheus URL)

Errors in the input are one line each, naming the field, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chatflow.sampler import MixtureSampler, Position
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRun, SpecError, load_run

if TYPE_CHECKING:  # the data pipeline imports datasets and transformers: only when needed
    from chatflow.data.store import PackedSource
    from chatflow.plan import Survey

DEFAULT_CACHE = Path(os.environ.get("CHATFLOW_CACHE_DIR", "~/.cache/chatflow")).expanduser()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except SpecError as e:
        for line in str(e).splitlines():
            print(f"chatflow: error: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `chatflow sample ... | head`
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], summary: str, run_file: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(command=handler)
        if run_file:
            sub.add_argument("-f", "--file", required=True, type=Path, help="ChatFlowRun manifest")
            sub.add_argument(
                "--cache-dir",
                type=Path,
                default=DEFAULT_CACHE,
                help="where tokenized, packed sources are cached ($CHATFLOW_CACHE_DIR)",
            )
        return sub

    example = command("example", _example, "build a bundled example's assets", run_file=False)
    example.add_argument("name", choices=["tiny"])
    example.add_argument(
        "--dest", type=Path, default=Path("manifests/examples/tiny-assets"), help="output directory"
    )

    schedule = command("schedule", _schedule, "show the planned mixture over the run")
    schedule.add_argument(
        "--at",
        type=int,
        action="append",
        metavar="N",
        help="target weights at progress N (in the schedule's unit); repeatable",
    )
    schedule.add_argument("--rows", type=int, default=11, help="table rows over the run")
    schedule.add_argument("--json", action="store_true", help="print JSON")
    schedule.add_argument("--png", type=Path, help="also plot planned vs realised mixture")
    schedule.add_argument(
        "--no-data", action="store_true", help="skip reading the data (no exhaustion warnings)"
    )

    train = command("train", _train, "train on this machine: torchrun, one process per device")
    train.add_argument(
        "--nproc", type=int, default=0, help="processes (default: one per GPU, else 2 on CPU)"
    )
    train.add_argument("--output", type=Path, help="checkpoints and final model (runs/<name>)")
    train.add_argument(
        "--log-samples", action="store_true", help="record each rank's global sample indices"
    )

    prepare = command(
        "prepare", _prepare_command, "tokenize and pack the data the run needs, in parallel"
    )
    prepare.add_argument(
        "--workers", type=int, help="worker processes (default: spec.data.preparation.workers)"
    )
    # Also from the environment: a TrainJob's dataset-initializer runs the runtime's command,
    # which is the same for every run, with the run's own env (see the operator's trainjob.py).
    prepare.add_argument(
        "--output",
        type=Path,
        default=os.environ.get("CHATFLOW_OUTPUT"),
        help="the run's output (runs/<name>): prepare from its newest checkpoint's position "
        "($CHATFLOW_OUTPUT)",
    )
    prepare.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("CHATFLOW_METRICS_PORT"),
        help="serve the chatflow_prepare_* metrics on this port ($CHATFLOW_METRICS_PORT)",
    )

    sample = command("sample", _sample, "show the source of each global sample index")
    sample.add_argument("--start", type=int, default=0, help="first global sample index")
    sample.add_argument("--count", type=int, default=20, help="how many samples")
    sample.add_argument("--json", action="store_true", help="print JSON")
    sample.add_argument(
        "--decode", action="store_true", help="read the data: show each sample's block and text"
    )
    report = command(
        "report",
        _report,
        "plot a run's planned vs realised mixture and held-out loss per source",
        run_file=False,
    )
    origin = report.add_mutually_exclusive_group(required=True)
    origin.add_argument("--prometheus", metavar="URL", help="read the run from this Prometheus")
    origin.add_argument(
        "--history", type=Path, metavar="FILE", help="read the trainer's <output>/history.jsonl"
    )
    report.add_argument("--run", help="the ChatFlowRun's name (required with --prometheus)")
    report.add_argument("--namespace", help="the run's namespace (default: any)")
    report.add_argument(
        "--start", help="--prometheus: from (Unix seconds or RFC 3339; default: 30 days ago)"
    )
    report.add_argument("--end", help="--prometheus: until (default: now)")
    report.add_argument(
        "-o", "--output", type=Path, default=Path("report.png"), help="the PNG (a .json beside it)"
    )
    return parser


# --- commands ----------------------------------------------------------------------------------


def _example(args: argparse.Namespace) -> int:
    from chatflow.examples import build_tiny_example

    dest = build_tiny_example(args.dest)
    print(f"tiny example assets in {dest}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    run = load_run(args.file)
    schedule = Schedule.from_spec(run.spec)
    if args.at:
        points = [
            {"at": at, "weights": _named(schedule, schedule.weights_at(at))} for at in args.at
        ]
        if args.json:
            print(json.dumps({"points": points}, indent=2))
        else:
            for point in points:
                weights = "  ".join(f"{k}={v:.3f}" for k, v in point["weights"].items())
                print(f"at {point['at']:,}: {weights}")
        return 0

    from chatflow.plan import survey

    sampler = MixtureSampler(schedule, run.spec.training.seed)
    total = run.spec.training.total_samples
    available = max_epochs = None
    if not args.no_data:
        packed = _prepare(run, args)
        # A source prepared only as far as the run needs has no known size: it does not repeat.
        available = [p.num_blocks if p.complete else None for p in packed]
        max_epochs = [s.max_epochs for s in run.spec.data.sources]
    result = survey(sampler, total, available, max_epochs)
    rows = _table_rows(schedule, total, args.rows)
    warnings = [u.warning for u in result.usage if u.warning]
    if args.json:
        usage = [
            {"source": u.name, "planned": u.planned, "available": u.available, "epochs": u.epochs}
            for u in result.usage
        ]
        print(json.dumps({"rows": rows, "sources": usage, "warnings": warnings}, indent=2))
    else:
        _print_schedule(run, rows, result)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.png:
        from chatflow.plot import plot_schedule

        plot_schedule(run, schedule, total, result, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from chatflow.train.launch import launch

    run = load_run(args.file)
    processes = args.nproc or torch.cuda.device_count() or 2
    output = args.output or Path("runs") / run.metadata.name
    return launch(args.file, run, output, args.cache_dir, processes, args.log_samples)


def _prepare_command(args: argparse.Namespace) -> int:
    import logging
    from concurrent.futures.process import BrokenProcessPool

    from chatflow.data.pipeline import load_tokenizer, prepare_sources
    from chatflow.data.prepare import checkpoint_position
    from chatflow.data.progress import Progress
    from chatflow.termination import termination_message

    logging.basicConfig(format="chatflow: %(levelname)s: %(message)s")
    if args.workers is not None and args.workers < 1:
        raise SpecError(f"--workers: {args.workers} is not a positive number of processes")
    run = load_run(args.file)
    output = args.output or Path("runs") / run.metadata.name
    try:
        tokenizer, _ = load_tokenizer(run.spec, args.file.parent)
        position = checkpoint_position(run.spec, output)
        progress = Progress(run.metadata.name, metrics_port=args.metrics_port)
        prepare_sources(
            run.spec,
            args.file.parent,
            args.cache_dir,
            tokenizer,
            position=position,
            workers=args.workers,
            progress=progress,
        )
    except SpecError as e:
        termination_message(str(e))  # in a pod, the operator shows it in the run's condition
        raise
    except BrokenProcessPool:
        problem = "a worker process died (killed, or out of memory?); run again to resume"
        termination_message(problem)
        print(f"chatflow: error: {problem}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from chatflow import report
    from chatflow.observability.prometheus import PrometheusError

    if args.history:
        data = report.from_history(args.history, args.run)
    elif not args.run:
        raise SpecError("--run: required with --prometheus")
    else:
        try:
            data = report.from_prometheus(
                args.prometheus, args.run, args.namespace, args.start, args.end
            )
        except PrometheusError as e:
            print(f"chatflow: error: --prometheus: {e}", file=sys.stderr)
            return 1
    report.plot(data, args.output)
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}", file=sys.stderr)
    return 0


def _sample(args: argparse.Namespace) -> int:
    if args.start < 0 or args.count <= 0:
        raise SpecError("--start must be >= 0 and --count > 0")
    run = load_run(args.file)
    sampler = MixtureSampler(Schedule.from_spec(run.spec), run.spec.training.seed)
    position = sampler.advance(Position.start(sampler.num_sources), args.start)
    plan, _ = sampler.plan(position, args.count)
    names = sampler.schedule.sources
    records = [
        {"index": int(n), "source": names[s], "ordinal": int(k)}
        for n, s, k in zip(plan.indices, plan.sources, plan.ordinals, strict=True)
    ]
    if args.decode:
        from chatflow.data.mixture import Mixture
        from chatflow.data.pipeline import load_tokenizer

        tokenizer, _ = load_tokenizer(run.spec, args.file.parent)
        mixture = Mixture(sampler, _prepare(run, args, tokenizer))
        for record, source in zip(records, plan.sources, strict=True):
            sample = mixture.sample(record["index"], int(source), record["ordinal"])
            text = tokenizer.decode(sample.input_ids[: sample.tokens], skip_special_tokens=True)
            record |= {
                "block": sample.block,
                "tokens": sample.tokens,
                "trained_tokens": int((sample.labels >= 0).sum()),
                "text": " ".join(text.split())[:60],
            }
    if args.json:
        print(json.dumps({"samples": records}, ensure_ascii=False, indent=2))
        return 0
    columns = list(records[0])
    print("  ".join(f"{c:>14}" if c != "text" else c for c in columns))
    for record in records:
        print("  ".join(f"{record[c]:>14}" if c != "text" else record[c] for c in columns))
    return 0


# --- helpers -----------------------------------------------------------------------------------


def _prepare(
    run: ChatFlowRun, args: argparse.Namespace, tokenizer: Any = None
) -> list[PackedSource]:
    from chatflow.data.pipeline import load_tokenizer, prepare_sources

    base_dir = args.file.parent
    tokenizer = tokenizer or load_tokenizer(run.spec, base_dir)[0]
    return prepare_sources(run.spec, base_dir, args.cache_dir, tokenizer)


def _named(schedule: Schedule, weights: np.ndarray) -> dict[str, float]:
    return {name: round(float(w), 6) for name, w in zip(schedule.sources, weights, strict=True)}


def _table_rows(schedule: Schedule, total: int, rows: int) -> list[dict]:
    samples = np.unique(np.linspace(0, total, max(rows, 2)).round().astype(np.int64))
    progress = schedule.progress(samples)
    return [
        {
            "sample": int(n),
            "progress": float(schedule.fraction_done(x)),
            "phase": schedule.phase_at(float(x))[1],
            "weights": _named(schedule, w),
        }
        for n, x, w in zip(samples, progress, schedule.weights_at(progress), strict=True)
    ]


def _print_schedule(run: ChatFlowRun, rows: list[dict], result: Survey) -> None:
    sources = run.spec.source_names
    width = max(8, *(len(s) for s in sources))
    print(
        f"{'sample':>12}  {'progress':>8}  {'phase':<10}"
        + "".join(f"{s:>{width + 2}}" for s in sources)
    )
    for row in rows:
        weights = "".join(f"{row['weights'][s]:>{width + 2}.3f}" for s in sources)
        print(f"{row['sample']:>12,}  {row['progress']:>8.2f}  {row['phase']:<10}{weights}")
    print()
    print(f"{'source':<{width}}  {'kind':<11}  {'planned':>10}  {'available':>10}  {'epochs':>7}")
    for spec, usage in zip(run.spec.data.sources, result.usage, strict=True):
        available = "?" if usage.available is None else f"{usage.available:,}"
        epochs = "?" if usage.epochs is None else f"{usage.epochs:.2f}"
        print(
            f"{usage.name:<{width}}  {spec.kind:<11}  {usage.planned:>10,}  {available:>10}"
            f"  {epochs:>7}"
        )
