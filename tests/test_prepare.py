"""Data preparation (chatflow prepare): bounded by the plan, parallel, resumable, appendable.

Shards and shuffle windows are made small here (SHARD_BYTES, SHUFFLE_WINDOW) so that a few hundred
kilobytes of text behave like a large corpus: many shards, of which a short run needs a few.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from chatflow import metric_names as names
from chatflow.data import sources, store
from chatflow.data.pipeline import build_mixture, prepare_sources
from chatflow.data.prepare import needed_samples, plan
from chatflow.data.progress import Progress
from chatflow.sampler import Position
from chatflow.spec import SpecError, parse_run
from cluster import free_port
from factories import run_document

SHARD_BYTES = 16 << 10
WINDOW = 8
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "which",
    "an",
    "be",
]


@pytest.fixture(autouse=True)
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "SHARD_BYTES", SHARD_BYTES)
    monkeypatch.setattr(store, "SHUFFLE_WINDOW", WINDOW)


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)


def write_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """JSON lines of varied English-like documents (~100 KiB per 400 documents)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(documents):
            words = rng.choice(WORDS, size=int(rng.integers(10, 80)))
            f.write(json.dumps({"text": f"document {i}: " + " ".join(words)}) + "\n")
    return path


def run_spec(tmp_path: Path, samples: int, **source: object):
    """A two-source run over data/web.jsonl (many shards) and data/small.jsonl (one)."""
    sources_ = [
        {"name": "web", "kind": "pretrain", "language": "en", "path": "data/web.jsonl"} | source,
        {"name": "small", "kind": "pretrain", "language": "en", "path": "data/small.jsonl"},
    ]
    # The mixture's change is in absolute samples, so a longer run keeps its first samples.
    schedule = {
        "curve": "linear",
        "growth": 2000,
        "start": {"web": 0.9, "small": 0.1},
        "end": {"web": 0.7, "small": 0.3},
    }
    training = {"seqLength": 16, "globalBatchSize": 8, "maxSamples": samples}
    document = run_document(schedule=schedule, training=training)
    document["spec"]["data"]["sources"] = sources_
    return parse_run(document).spec


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "data/web.jsonl", 4000)  # ~1 MiB: ~60 shards
    write_corpus(tmp_path / "data/small.jsonl", 300, seed=1)
    return tmp_path


def shard_files(entry: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every prepared shard's (inode, mtime, content) of its input ids."""
    return {
        d.name: (
            (d / "input_ids.bin").stat().st_ino,
            (d / "meta.json").stat().st_mtime_ns,
            (d / "input_ids.bin").read_bytes(),
        )
        for d in sorted(entry.glob("shard-*"))
    }


def first_samples(spec, base: Path, cache: Path, tokenizer, count: int) -> list[tuple]:
    mixture = build_mixture(spec, prepare_sources(spec, base, cache, tokenizer, prepared=True))
    return [
        (s.index, s.source, s.block, s.input_ids.tobytes())
        for s in islice(mixture.samples(Position.start(2)), count)
    ]


def test_a_short_run_prepares_only_the_shards_it_needs(corpus: Path, tokenizer) -> None:
    spec = run_spec(corpus, samples=400)
    [web, small] = prepare_sources(spec, corpus, corpus / "cache", tokenizer, workers=1)
    planned = needed_samples(spec)
    listing = store.read_listing(web.directory)
    assert len(listing) > 40 and not web.complete and small.covers(planned[1])
    # The need: the held-out blocks, then whole shuffle windows of the planned samples.
    need = 8 + -(-planned[0] // WINDOW) * WINDOW
    assert web.blocks >= need and web.covers(planned[0])
    assert web.blocks - web.shard_blocks[-1] < need  # one shard fewer would not do
    assert len(web.shard_blocks) < len(listing) / 4


def test_output_does_not_depend_on_the_number_of_workers(corpus: Path, tokenizer) -> None:
    spec = run_spec(corpus, samples=800)
    one = prepare_sources(spec, corpus, corpus / "one", tokenizer, workers=1)
    two = prepare_sources(spec, corpus, corpus / "two", tokenizer, workers=2)
    for a, b in zip(one, two, strict=True):
        files_a, files_b = shard_files(a.directory), shard_files(b.directory)
        for name in files_a.keys() & files_b.keys():
            assert files_a[name][2] == files_b[name][2]
        assert a.shard_blocks == b.shard_blocks[: len(a.shard_blocks)]
    assert first_samples(spec, corpus, corpus / "one", tokenizer, 800) == first_samples(
        spec, corpus, corpus / "two", tokenizer, 800
    )


def test_a_longer_run_appends_shards_and_keeps_every_planned_sample(corpus, tokenizer) -> None:
    short = run_spec(corpus, samples=400)
    prepare_sources(short, corpus, corpus / "cache", tokenizer, workers=1)
    before = first_samples(short, corpus, corpus / "cache", tokenizer, 400)
    [web, _] = prepare_sources(short, corpus, corpus / "cache", tokenizer, prepared=True)
    files = shard_files(web.directory)
    blocks = [web.block_of(k) for k in range(needed_samples(short)[0])]

    longer = run_spec(corpus, samples=1600)
    with pytest.raises(SpecError, match=r"^spec\.data\.sources\[0\]: 'web' is not prepared"):
        prepare_sources(longer, corpus, corpus / "cache", tokenizer, prepared=True)
    [grown, _] = prepare_sources(longer, corpus, corpus / "cache", tokenizer, workers=2)
    assert len(grown.shard_blocks) > len(web.shard_blocks)
    after = shard_files(grown.directory)
    assert all(after[name] == files[name] for name in files)  # nothing rewritten
    assert [grown.block_of(k) for k in range(len(blocks))] == blocks
    assert first_samples(longer, corpus, corpus / "cache", tokenizer, 400) == before


def test_a_resumed_run_needs_what_is_left_from_its_checkpoint(corpus: Path, tokenizer) -> None:
    spec = run_spec(corpus, samples=400)
    start = needed_samples(spec)
    # Halfway, with a schedule changed to take only `small` from now on: `web` needs no more.
    halfway = Position(200, (180, 20))
    changed = spec.model_copy(
        update={"schedule": spec.schedule.model_copy(update={"end": {"web": 0.0, "small": 1.0}})}
    )
    resumed = needed_samples(changed, halfway)
    assert resumed[0] < start[0] and resumed[0] >= 180 and resumed[1] > start[1]


def test_a_source_smaller_than_its_need(corpus: Path, tokenizer, caplog) -> None:
    spec = run_spec(corpus, samples=40000, maxEpochs=1)
    with pytest.raises(
        SpecError, match=r"^spec\.data\.sources\[0\]\.maxEpochs: the run takes "
    ) as e:
        prepare_sources(spec, corpus, corpus / "cache", tokenizer, workers=1)
    assert "epochs, more than maxEpochs 1" in str(e.value) and "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING):
        [web, _] = prepare_sources(
            run_spec(corpus, samples=40000), corpus, corpus / "cache", tokenizer
        )
    assert web.complete
    assert "the run takes" in caplog.text and "it repeats" in caplog.text


def test_compressed_and_many_files_read_like_one_plain_file(corpus: Path, tokenizer) -> None:
    text = (corpus / "data/web.jsonl").read_bytes()
    lines = text.splitlines(keepends=True)
    parts = corpus / "parts"
    parts.mkdir()
    for i in range(0, len(lines), 500):  # 8 files: 4 gzip, 4 zstd
        chunk = b"".join(lines[i : i + 500])
        if i // 500 % 2:
            import zstandard

            (parts / f"{i:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(chunk))
        else:
            (parts / f"{i:05d}.jsonl.gz").write_bytes(gzip.compress(chunk))
    plain = run_spec(corpus, samples=40000)
    compressed = run_spec(corpus, samples=40000, path="parts")
    [a, _] = prepare_sources(plain, corpus, corpus / "a", tokenizer, workers=1)
    [b, _] = prepare_sources(compressed, corpus, corpus / "b", tokenizer, workers=1)
    assert a.complete and b.complete and a.documents == b.documents == 4000
    assert len(store.read_listing(b.directory)) == 8  # a compressed file is one shard
    assert a.tokens == b.tokens


@pytest.mark.parametrize("streaming", [True, False])
def test_a_hub_dataset_of_many_data_files_reads_lazily_like_local_files(
    corpus: Path, tokenizer, monkeypatch: pytest.MonkeyPatch, streaming: bool
) -> None:
    # An id that is no path beside the manifest is a hub dataset, which `datasets` resolves to a
    # directory of that name in the working directory first: the hub's loader, offline.
    lines = (corpus / "data/web.jsonl").read_text().splitlines(keepends=True)
    hub = corpus / "hub"
    for i in range(0, len(lines), 500):  # 8 data files
        path = hub / "example-org/web" / f"part-{i // 500:02d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines[i : i + 500]))
    monkeypatch.chdir(hub)
    import datasets

    # A downloaded dataset's Arrow files go to the test's directory, not the user's cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", corpus / "hf-cache")
    monkeypatch.setattr(sources, "HUB_ROWS_PER_SHARD", 700)
    spec = run_spec(corpus, samples=400, path="example-org/web", streaming=streaming)
    shards = sources.input_shards(spec.data.sources[0], corpus)
    assert all(s.file is None for s in shards) and len(shards) == (8 if streaming else 6)
    # A short run reads its first data files, not the whole dataset.
    [web, _] = prepare_sources(spec, corpus, corpus / "short", tokenizer, workers=2)
    assert not web.complete and web.covers(needed_samples(spec)[0])
    # All of it packs exactly as the same records from a local file do.
    whole = run_spec(corpus, samples=40000, path="example-org/web", streaming=streaming)
    [a, _] = prepare_sources(whole, corpus, corpus / "whole", tokenizer, workers=2)
    [b, _] = prepare_sources(run_spec(corpus, 40000), corpus, corpus / "local", tokenizer)
    assert a.complete and a.documents == b.documents == 4000 and a.tokens == b.tokens
    assert np.array_equal(a.example(0)[0], b.example(0)[0])


@pytest.mark.parametrize(
    ("name", "content", "field", "message"),
    [
        (
            "bad.jsonl.gz",
            gzip.compress(b'{"text": "a"}\n')[:-12] + b"garbage!",
            "path",
            r"bad\.jsonl\.gz: cannot read records",
        ),
        (
            "bad.jsonl",
            b'{"text": "a"}\n{"text": "b"\n',
            "path",
            r"bad\.jsonl: the record at byte 14 is not valid JSON",
        ),
        ("bad.jsonl", b'{"body": "a"}\n', "textField", r"no column 'text' in the data"),
        (
            "bad.parquet",
            b"PAR1 not really parquet",
            "path",
            r"bad\.parquet: not a readable parquet file",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_source_field(
    corpus: Path, tokenizer, name: str, content: bytes, field: str, message: str
) -> None:
    (corpus / "data" / name).write_bytes(content)
    spec = run_spec(corpus, samples=400, path=f"data/{name}")
    expected = rf"^spec\.data\.sources\[0\]\.{field}: .*{message}"
    for workers in (1, 2):
        with pytest.raises(SpecError, match=expected) as error:
            prepare_sources(spec, corpus, corpus / "cache", tokenizer, workers=workers)
        assert "\n" not in str(error.value)
    assert not list((corpus / "cache").glob("web-*/*shard-*"))  # nothing half-written left


def test_progress_reports_json_lines_and_prometheus_metrics(corpus, tokenizer) -> None:
    import io

    port = free_port()
    stream = io.StringIO()
    progress = Progress("demo", stream=stream, metrics_port=port)
    spec = run_spec(corpus, samples=400)
    prepare_sources(spec, corpus, corpus / "cache", tokenizer, workers=1, progress=progress)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records][:1] == ["start"] and records[-1]["event"] == "done"
    assert records[-1]["shards_done"] == records[-1]["shards_total"] == len(records) - 2
    assert records[-1]["tokens"] == records[-2]["tokens"] > 0  # totals so far
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for name in (
        names.PREPARE_TOKENS,
        names.PREPARE_SHARDS_DONE,
        names.PREPARE_SHARDS_TOTAL,
        names.PREPARE_DOCUMENTS,
        names.PREPARE_READ_BYTES,
    ):
        assert f'{name}{{run="demo",source="web"}}' in metrics


PREPARE = """
import sys
from chatflow.data import sources, store
sources.SHARD_BYTES, store.SHUFFLE_WINDOW = {shard_bytes}, {window}
from chatflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def chatflow_prepare(manifest: Path, cache: Path, workers: int) -> subprocess.Popen:
    """`chatflow prepare` in a process of its own, with this module's small shards."""
    code = PREPARE.format(shard_bytes=SHARD_BYTES, window=WINDOW)
    command = [sys.executable, "-c", code, "prepare", "-f", str(manifest)]
    command += ["--cache-dir", str(cache), "--workers", str(workers)]
    command += ["--output", str(manifest.parent / "out")]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest(corpus: Path, samples: int, llama_tokenizer_dir: Path) -> Path:
    document = run_document(
        schedule={"curve": "linear", "growth": 2000, "start": {"web": 1.0}, "end": {"web": 1.0}},
        training={"seqLength": 16, "globalBatchSize": 8, "maxSamples": samples},
    )
    document["spec"]["data"]["sources"] = [
        {"name": "web", "kind": "pretrain", "language": "en", "path": "data/web.jsonl"}
    ]
    document["spec"]["model"] = {"base": str(llama_tokenizer_dir)}
    path = corpus / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def kill_mid_shard(entry: Path, workers: list[int]) -> Path | None:
    """SIGKILL a worker while it writes a shard; that shard's temporary directory, or None.

    The worker is stopped first, so it cannot finish and rename the shard between our look at
    its directory (named after its pid) and the kill.
    """
    for tmp in entry.glob(".shard-*.tmp-*"):
        pid = int(tmp.name.split("-")[-2])
        if pid not in workers:
            continue
        os.kill(pid, signal.SIGSTOP)
        if tmp.exists():
            os.kill(pid, signal.SIGKILL)
            return tmp
        os.kill(pid, signal.SIGCONT)
    return None


def wait_for_workers(process: subprocess.Popen, count: int = 2) -> list[int]:
    """The pids of the preparation's worker processes, once `count` of them run."""
    deadline = time.monotonic() + 120
    while len(workers := children(process.pid)) < count:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the preparation started no workers"
        time.sleep(0.05)
    return workers


def test_a_killed_worker_leaves_nothing_half_read_and_the_rerun_resumes(
    corpus: Path, tokenizer, llama_tokenizer_dir: Path
) -> None:
    write_corpus(corpus / "data/web.jsonl", 8000)  # ~2 MiB: ~100 shards, seconds of work
    run = manifest(corpus, 100_000, llama_tokenizer_dir)  # more than all of it: all is needed
    cache = corpus / "cache"
    process = chatflow_prepare(run, cache, workers=2)
    try:
        deadline = time.monotonic() + 120
        entry = killed = None
        while killed is None and time.monotonic() < deadline:
            entries = list(cache.glob("web-*"))
            entry = entries[0] if entries else None
            if entry and len(list(entry.glob("shard-*"))) >= 5:
                killed = kill_mid_shard(entry, children(process.pid))
            time.sleep(0.005)
        if killed is None:
            pytest.fail("the preparation did not get going")
        assert process.wait(timeout=120) != 0
    finally:
        process.kill()
        process.wait()
    assert entry is not None
    assert killed.exists()  # the killed shard's remains
    done = shard_files(entry)
    listing = store.read_listing(entry)
    assert 5 <= len(done) < len(listing)

    rerun = chatflow_prepare(run, cache, workers=2)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    after = shard_files(entry)
    assert all(after[name] == done[name] for name in done)  # finished shards not redone
    assert len(after) == len(listing)
    shards = [json.loads(line) for line in out.splitlines() if '"shard"' in line]
    assert len(shards) == len(listing) - len(done)
    # The same bytes as one clean preparation.
    spec = parse_run(yaml.safe_load(run.read_text())).spec
    [clean] = prepare_sources(spec, corpus, corpus / "clean", tokenizer, workers=1)
    clean_files = shard_files(clean.directory)
    assert {n: f[2] for n, f in clean_files.items()} == {n: f[2] for n, f in after.items()}


def test_workers_die_with_a_killed_preparation(corpus: Path, llama_tokenizer_dir: Path) -> None:
    write_corpus(corpus / "data/web.jsonl", 8000)
    process = chatflow_prepare(manifest(corpus, 100_000, llama_tokenizer_dir), corpus / "c", 2)
    try:
        workers = wait_for_workers(process)
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their preparation"
        time.sleep(0.1)


def test_preparations_of_one_cache_at_once_agree(corpus: Path, tokenizer, llama_tokenizer_dir):
    run = manifest(corpus, 20000, llama_tokenizer_dir)
    processes = [chatflow_prepare(run, corpus / "cache", workers=1) for _ in range(3)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    spec = parse_run(yaml.safe_load(run.read_text())).spec
    [shared] = prepare_sources(spec, corpus, corpus / "cache", tokenizer, prepared=True)
    [clean] = prepare_sources(spec, corpus, corpus / "clean", tokenizer, workers=1)
    assert shared.shard_blocks == clean.shard_blocks
    shared_files, clean_files = shard_files(shared.directory), shard_files(clean.directory)
    assert {n: f[2] for n, f in shared_files.items()} == {n: f[2] for n, f in clean_files.items()}
    assert not list(shared.directory.glob(".shard-*"))  # every loser dropped its copy


def test_plan_reads_the_cache_and_writes_nothing(corpus: Path, tokenizer) -> None:
    spec = run_spec(corpus, samples=400)
    plans = plan(spec, corpus, corpus / "cache", tokenizer)
    assert [p.done for p in plans] == [{}, {}] and not (corpus / "cache").exists()
    assert plans[0].shards_needed < len(plans[0].shards)
