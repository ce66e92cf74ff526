"""`chatflow report`: one picture of a run, from Prometheus or from the run's own history.jsonl.

Panels: the planned against the realised mixture per source, held-out loss per source (the
cross-lingual transfer), training loss and throughput, all against the global sample count, as
`chatflow schedule --png` plots the plan. Beside the PNG, a JSON file names the panels and the
series each one shows, for scripts and tests.

From Prometheus the report runs the named queries of observability/queries.py, as the dashboard
does; from history.jsonl it reads the step and eval records that the trainer's rank 0 appends.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from chatflow import history
from chatflow.observability import queries as q
from chatflow.observability.prometheus import query_range
from chatflow.spec import SpecError

PANELS = (
    "Mixture per source: planned (lines) and realised (dots)",
    "Held-out loss per source",
    "Training loss",
    "Throughput (tokens/s)",
)
# Prometheus answers at most 11,000 points a series; a run is found at a coarse step first, which
# must stay under its 5-minute look-back so that no run falls between two points.
SEARCH_POINTS = 10_000
POINTS = 500
DEFAULT_SEARCH_SECONDS = 30 * 86400
# The realised mixture is pooled over this fraction of the run's points: one batch is too small
# a sample of it, and a trailing window much longer than this lags the plan visibly.
REALISED_WINDOW = 0.02


@dataclass
class Curve:
    """Values against the global sample count."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class RunData:
    run: str
    origin: str  # where the data came from, for the title
    planned: dict[str, Curve] = field(default_factory=dict)
    realised: dict[str, Curve] = field(default_factory=dict)
    held_out: dict[str, Curve] = field(default_factory=dict)
    loss: Curve | None = None
    tokens_per_second: Curve | None = None


# --- from history.jsonl --------------------------------------------------------------------------


def from_history(path: Path, run: str | None = None) -> RunData:
    """The run as its trainer recorded it (`chatflow.history`)."""
    recorded = history.read(path)
    steps, evals = recorded.steps, recorded.evals
    if not steps:
        raise SpecError(f"--history: {path} has no step records")
    records = [steps[s] for s in sorted(steps)]
    samples = np.array([r["samples"] for r in records], dtype=float)
    data = RunData(run or path.parent.name, str(path))
    names = list(records[0]["target"])
    window = max(1, round(len(records) * REALISED_WINDOW))
    for name in names:
        data.planned[name] = Curve(samples, np.array([r["target"][name] for r in records]))
        drawn = np.array([r["realised"][name] for r in records])
        data.realised[name] = Curve(samples, _moving_mean(drawn, window))
    samples_at = {s: r["samples"] for s, r in steps.items()}
    for name in names:
        points = [(samples_at[s], loss[name]) for s, loss in sorted(evals.items()) if name in loss]
        if points:
            x, y = zip(*points, strict=True)
            data.held_out[name] = Curve(np.array(x, dtype=float), np.array(y, dtype=float))
    data.loss = Curve(samples, np.array([float(r["loss"]) for r in records]))
    data.tokens_per_second = Curve(samples, np.array([r["tokens_per_second"] for r in records]))
    return data


def _moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the `window - 1` before it. Every step draws one global batch,
    so the mean of the steps' fractions is the fraction of the window's samples."""
    sums = np.convolve(values, np.ones(window))[: len(values)]
    return sums / np.minimum(np.arange(1, len(values) + 1), window)


# --- from Prometheus -----------------------------------------------------------------------------


def from_prometheus(
    url: str,
    run: str,
    namespace: str | None = None,
    start: str | None = None,
    end: str | None = None,
) -> RunData:
    """The run as Prometheus scraped it, between `start` and `end` (default: the last 30 days)."""
    end_time = parse_time(end, "--end") if end else time.time()
    start_time = parse_time(start, "--start") if start else end_time - DEFAULT_SEARCH_SECONDS
    if start_time >= end_time:
        raise SpecError("--start must be before --end")
    where = f"{namespace}/{run}" if namespace else run

    def series(query: q.Query, begin: float, finish: float, step: float) -> list[dict[str, Any]]:
        expr = q.fill(query.expr, run=run, namespace=namespace or ".*")
        return query_range(url, expr, begin, finish, step)

    # Where the run has data: its first and last scrape at a coarse step, then a fine range.
    search_step = max((end_time - start_time) / SEARCH_POINTS, 1.0)
    found = series(q.SAMPLES_BY_NAMESPACE, start_time, end_time, search_step)
    if not found:
        raise SpecError(f"--run: Prometheus at {url} has no samples of run {where} in that time")
    if len(found) > 1:
        spaces = ", ".join(sorted(s["metric"].get("namespace", "") for s in found))
        raise SpecError(f"--run: run {run} is in several namespaces ({spaces}): pass --namespace")
    # The run's first sample lies within one coarse step before the first point that sees it. A
    # second search inside that span finds it to within seconds: a run much shorter than the
    # coarse step would otherwise be drawn from a handful of points.
    times = [float(t) for t, _ in found[0]["values"]]
    begin, finish = times[0] - search_step, times[-1]
    refine_step = max((finish - begin) / SEARCH_POINTS, 1.0)
    times = [
        float(t) for t, _ in series(q.SAMPLES_BY_NAMESPACE, begin, finish, refine_step)[0]["values"]
    ]
    # Data that arrived after the last refined point (a running run's newest) lies within a step.
    begin, finish = times[0] - refine_step, min(times[-1] + refine_step, end_time)
    step = max((finish - begin) / POINTS, 1.0)

    samples = {t: float(v) for t, v in series(q.SAMPLES, begin, finish, step)[0]["values"]}

    def curves(query: q.Query) -> dict[str, Curve]:
        result = {}
        for s in series(query, begin, finish, step):
            points = [(samples[t], float(v)) for t, v in s["values"] if t in samples]
            if points:
                x, y = zip(*points, strict=True)
                result[s["metric"].get("source", "")] = Curve(np.array(x), np.array(y))
        return dict(sorted(result.items()))

    def curve(query: q.Query) -> Curve | None:
        return next(iter(curves(query).values()), None)

    data = RunData(run, f"{url}, {where}")
    data.planned = curves(q.MIXTURE_TARGET)
    # Realised from the sample counters between points, not the dashboard's rate over a fixed
    # window: the report's window follows the run's length, as it does for history.jsonl.
    drawn = curves(q.SOURCE_SAMPLES)
    window = max(1, round(POINTS * REALISED_WINDOW))
    data.realised = {name: _realised(counts, window) for name, counts in drawn.items()}
    # A gauge holds its value between evaluations: keep the points where it changed.
    data.held_out = {name: _changes(c) for name, c in curves(q.HELDOUT_LOSS).items()}
    data.loss = curve(q.LOSS)
    data.tokens_per_second = curve(q.TOKENS_PER_SECOND)
    return data


def _realised(drawn: Curve, window: int) -> Curve:
    """A source's fraction of the samples between each point and the `window`-th before it, from
    its sample count (y) against the run's (x). A restart that redoes steps after its checkpoint
    moves the counts back: those spans are left out."""
    x, y = drawn.x, drawn.y
    if len(x) <= window:
        return Curve(x[:0], y[:0])
    dx, dy = x[window:] - x[:-window], y[window:] - y[:-window]
    valid = (dx > 0) & (dy >= 0)
    return Curve(x[window:][valid], dy[valid] / dx[valid])


def _changes(curve: Curve) -> Curve:
    keep = np.concatenate([[True], np.diff(curve.y) != 0]) if len(curve.y) else []
    return Curve(curve.x[keep], curve.y[keep])


def parse_time(text: str, option: str) -> float:
    """Unix seconds, or an RFC 3339 / ISO 8601 time (local time when it names no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SpecError(f"{option}: {text!r} is not Unix seconds nor an RFC 3339 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.now().astimezone().tzinfo)
    return moment.timestamp()


# --- the picture ---------------------------------------------------------------------------------


def plot(data: RunData, path: Path) -> dict[str, Any]:
    """Write the PNG at `path` and its summary beside it (`.json`); return the summary."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys([*data.planned, *data.realised, *data.held_out]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    figure, grid = plt.subplots(2, 2, figsize=(14, 8.5), dpi=100)
    mixture, held_out, loss, throughput = grid.flat
    for name, curve in data.planned.items():
        mixture.plot(curve.x, curve.y, color=colour[name], label=f"{name} planned")
    for name, curve in data.realised.items():
        mixture.plot(curve.x, curve.y, "o", color=colour[name], markersize=2.5, alpha=0.6)
    mixture.set(ylim=(0, 1), ylabel="fraction of samples")
    for name, curve in data.held_out.items():
        held_out.plot(curve.x, curve.y, "o-", color=colour[name], markersize=3, label=name)
    held_out.set(ylabel="loss")
    for axes, curve, label in (
        (loss, data.loss, "training loss"),
        (throughput, data.tokens_per_second, "tokens/s"),
    ):
        if curve is not None:
            axes.plot(curve.x, curve.y, color="C0", linewidth=1, label=label)
    loss.set(ylabel="loss")
    throughput.set(ylabel="tokens per second")
    for axes, title in zip(grid.flat, PANELS, strict=True):
        axes.set(title=title, xlabel="global sample")
        if axes.lines:
            axes.legend(fontsize="small", ncol=2 if axes is mixture else 1)
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle(f"ChatFlowRun {data.run} ({data.origin})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)

    summary = {
        "run": data.run,
        "from": data.origin,
        "png": path.name,
        "panels": [
            {"title": PANELS[0], "planned": list(data.planned), "realised": list(data.realised)},
            {"title": PANELS[1], "sources": list(data.held_out)},
            {"title": PANELS[2], "points": _points(data.loss)},
            {"title": PANELS[3], "points": _points(data.tokens_per_second)},
        ],
    }
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _points(curve: Curve | None) -> int:
    return 0 if curve is None else int(np.count_nonzero(~np.isnan(curve.y)))
