"""A preparation's progress: a line in a terminal, JSON lines in a pod, Prometheus metrics.

Shards done and needed are counted over the run's need (prepared earlier or now); documents,
tokens and bytes over the shards this process prepared.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from chatflow import metric_names as names
from chatflow.data.prepare import SourcePlan


class Progress:
    def __init__(
        self,
        run: str,
        *,
        stream: TextIO | None = None,
        json_lines: bool | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.run = run
        # A terminal gets a line redrawn in place (on stderr); a pod's log (no terminal) a JSON
        # line per shard on stdout.
        self.json_lines = not sys.stderr.isatty() if json_lines is None else json_lines
        self.stream = stream or (sys.stdout if self.json_lines else sys.stderr)
        self.plans: list[SourcePlan] = []
        self.totals = {"documents": 0, "tokens": 0, "read_bytes": 0}
        self.started = time.monotonic()
        self.metrics = _Metrics(run, metrics_port) if metrics_port else None

    def start(self, plans: list[SourcePlan]) -> None:
        self.plans = plans
        for p in plans:
            self._update(p)
        self._emit({"event": "start", "sources": {p.source.name: self._state(p) for p in plans}})

    def shard_done(self, p: SourcePlan, shard: int, meta: dict[str, Any]) -> None:
        for key in self.totals:
            self.totals[key] += meta[key]
        if self.metrics:
            self.metrics.add(p.source.name, meta)
        self._update(p)
        self._emit({"event": "shard", "source": p.source.name, "shard": shard, **self._state(p)})

    def finish(self) -> None:
        self._emit({"event": "done"}, final=True)

    def _update(self, p: SourcePlan) -> None:
        if self.metrics:
            self.metrics.shards(p.source.name, p.shards_done, p.shards_needed)

    @staticmethod
    def _state(p: SourcePlan) -> dict[str, Any]:
        return {"shards_done": p.shards_done, "shards_total": p.shards_needed}

    def _emit(self, record: dict[str, Any], final: bool = False) -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        done = sum(p.shards_done for p in self.plans)
        total = sum(p.shards_needed for p in self.plans)
        rate = self.totals["tokens"] / seconds
        if self.json_lines:
            record |= {"run": self.run, **self.totals, "tokens_per_second": round(rate)}
            if record["event"] != "shard":
                record |= {"shards_done": done, "shards_total": total}
            print(json.dumps(record), file=self.stream, flush=True)
            return
        line = (
            f"\rpreparing {self.run}: {done}/{total} shards  "
            f"{self.totals['documents']:,} documents  {self.totals['tokens'] / 1e6:,.1f}M tokens  "
            f"{rate / 1e6:.2f}M tokens/s  {self.totals['read_bytes'] / 2**20:,.0f} MiB read"
        )
        print(line, end="\n" if final else "", file=self.stream, flush=True)


class _Metrics:
    """The `chatflow_prepare_*` metrics, served on `port` while the preparation runs."""

    def __init__(self, run: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.run = run
        registry = CollectorRegistry()

        def counter(name: str, help: str) -> Counter:
            # prometheus_client adds `_total` to a counter's name itself.
            return Counter(
                name.removesuffix("_total"), help, names.PREPARE_LABELS, registry=registry
            )

        self.documents = counter(names.PREPARE_DOCUMENTS, "documents tokenized")
        self.tokens = counter(names.PREPARE_TOKENS, "tokens written to packed blocks")
        self.read_bytes = counter(names.PREPARE_READ_BYTES, "input bytes read")
        self.done = Gauge(
            names.PREPARE_SHARDS_DONE,
            "shards of the run's need written",
            names.PREPARE_LABELS,
            registry=registry,
        )
        self.total = Gauge(
            names.PREPARE_SHARDS_TOTAL,
            "shards the run needs (an estimate until read)",
            names.PREPARE_LABELS,
            registry=registry,
        )
        start_http_server(port, registry=registry)

    def add(self, source: str, meta: dict[str, Any]) -> None:
        self.documents.labels(self.run, source).inc(meta["documents"])
        self.tokens.labels(self.run, source).inc(meta["tokens"])
        self.read_bytes.labels(self.run, source).inc(meta["read_bytes"])

    def shards(self, source: str, done: int, total: int) -> None:
        self.done.labels(self.run, source).set(done)
        self.total.labels(self.run, source).set(total)
