"""A source's raw records, read lazily in input shards.

An input shard is the unit of preparation work, defined by the input alone (never by how many
workers read it), so the prepared output does not depend on the worker count:
- a byte range of an uncompressed line file (.jsonl, JSON-lines .json, .txt): a record belongs to
  the range its line starts in, so ranges split a file of any size without reading it first;
- a row group of a .parquet file;
- a whole compressed (.gz, .zst), JSON-array or .arrow file, which cannot be entered mid-way;
- a shard (data file) of a Hugging Face hub dataset, read as a stream; without `streaming`, a
  range of rows of the dataset downloaded to the datasets cache.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from chatflow.spec import SourceSpec, SpecError

# File suffix (before any compression suffix) -> record format.
FILE_TYPES = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",
}
COMPRESSION = (".gz", ".zst")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

# A byte range of an uncompressed line file: ~4M tokens, seconds of one worker. Small enough that
# a run needing a sliver of a corpus spreads even that over its workers, large enough that what a
# shard costs beside tokenizing (a directory, three fsyncs, a rename) stays under 1%.
SHARD_BYTES = 16 << 20
HUB_ROWS_PER_SHARD = 100_000  # a downloaded (non-streaming) hub dataset's rows per shard
RECORDS_PER_BATCH = 1000

Batch = dict[str, list[Any]]  # column name -> values


class SourceError(SpecError):
    """A problem with one source's data; the pipeline prefixes the source's field path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # raised in worker processes
        return SourceError, (self.field, self.message)


@dataclass(frozen=True)
class InputShard:
    """One unit of work: `file` (None for the hub) from `start` to `stop`.

    start/stop are byte offsets of a line file, a row group number of a parquet file, a shard
    index of a streamed hub dataset, or a row range of a downloaded one; stop None: to the end.
    """

    file: str | None
    start: int = 0
    stop: int | None = None
    size: int = 0  # input bytes, for progress (0 when unknown)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = self.file or "hub"
        return (
            where if self.stop is None and not self.start else f"{where}[{self.start}:{self.stop}]"
        )


def local_path(path: str, base_dir: Path) -> Path:
    """A path from the spec: relative paths are relative to the manifest's directory."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def first_line(error: BaseException) -> str:
    """The first line of the root cause of a library's error: enough for a one-line message."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def file_type(path: Path) -> str | None:
    """The record format of a data file, looking through a compression suffix."""
    name = path.name[: -len(path.suffix)] if path.suffix in COMPRESSION else path.name
    return FILE_TYPES.get(Path(name).suffix)


def local_files(source: SourceSpec, base_dir: Path) -> list[Path] | None:
    """The local files a source names, or None when its path is a hub dataset id."""
    path = local_path(source.path, base_dir)
    if glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if file_type(p))
    elif path.exists():
        files = [path]
    elif HUB_ID.match(source.path) and not Path(source.path).suffix:
        return None
    else:
        raise SourceError("path", f"no such file or directory: {path}")
    files = [f for f in files if f.is_file()]
    if not files:
        kinds = ", ".join([*FILE_TYPES, *(f"(+{c})" for c in COMPRESSION)])
        raise SourceError("path", f"no data files ({kinds}) in {path}")
    kinds = {file_type(f) for f in files}
    if len(kinds) != 1 or None in kinds:
        names = ", ".join(sorted({"".join(f.suffixes) or f.name for f in files}))
        raise SourceError("path", f"mixed or unknown file types ({names})")
    return files


def input_shards(source: SourceSpec, base_dir: Path) -> list[InputShard]:
    """The source's input shards, in the order their records are packed."""
    files = local_files(source, base_dir)
    if files is None:
        return _hub_shards(source)
    shards = []
    for path in files:
        shards += _file_shards(path)
    return shards


def _file_shards(path: Path) -> list[InputShard]:
    size = path.stat().st_size
    kind = file_type(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as e:
            raise SourceError(
                "path", f"{path}: not a readable parquet file: {first_line(e)}"
            ) from None
        return [
            InputShard(str(path), g, g + 1, metadata.row_group(g).total_byte_size)
            for g in range(metadata.num_row_groups)
        ]
    if kind == "arrow" or path.suffix in COMPRESSION or _json_document(path):
        return [InputShard(str(path), 0, None, size)]
    return [
        InputShard(str(path), start, min(start + SHARD_BYTES, size), min(SHARD_BYTES, size - start))
        for start in range(0, max(size, 1), SHARD_BYTES)
    ]


def _json_document(path: Path) -> bool:
    """A .json file holding one JSON array rather than JSON lines."""
    if path.suffix != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def read_shard(
    source: SourceSpec, base_dir: Path, shard: InputShard
) -> Iterator[tuple[Batch, int]]:
    """The shard's records in batches, each with the input bytes read for it."""
    if shard.file is None:
        yield from _read_hub(source, shard)
        return
    path = Path(shard.file)
    kind = file_type(path)
    try:
        if kind == "parquet":
            yield from _read_parquet(path, shard)
        elif kind == "arrow":
            yield from _read_arrow(path)
        elif _json_document(path):
            records = json.loads(path.read_bytes())
            if not isinstance(records, list):
                raise SourceError("path", f"{path}: a .json file must hold JSON lines or one array")
            yield from _batches(iter(records), path.stat().st_size)
        else:
            yield from _read_lines(path, shard, kind == "json")
    except SourceError:
        raise
    except Exception as e:  # a corrupt file surfaces here, possibly deep in a stream
        raise SourceError("path", f"{path}: cannot read records: {first_line(e)}") from None


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # type: ignore[return-value]
    return open(path, "rb")


def _read_lines(path: Path, shard: InputShard, is_json: bool) -> Iterator[tuple[Batch, int]]:
    with _open(path) as raw:
        f = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw  # type: ignore[arg-type]
        offset = shard.start
        if offset:  # the line that started before the range belongs to the previous shard
            f.seek(offset - 1)
            offset += len(f.readline()) - 1
        records: list[Any] = []
        read = 0
        while shard.stop is None or offset < shard.stop:
            line = f.readline()
            if not line:
                break
            start, offset = offset, offset + len(line)
            read += len(line)
            if is_json:
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise SourceError(
                        "path", f"{path}: the record at byte {start} is not valid JSON: {e}"
                    ) from None
            else:
                records.append({"text": line.decode("utf-8", errors="replace").rstrip("\r\n")})
            if len(records) == RECORDS_PER_BATCH:
                yield _columns(records), read
                records, read = [], 0
        if records or read:
            yield _columns(records), read


def _read_parquet(path: Path, shard: InputShard) -> Iterator[tuple[Batch, int]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(shard.start)
    batches = table.to_batches(max_chunksize=RECORDS_PER_BATCH)
    for i, batch in enumerate(batches):
        yield batch.to_pydict(), shard.size if i == 0 else 0


def _read_arrow(path: Path) -> Iterator[tuple[Batch, int]]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)  # type: ignore[assignment]
        first = True
        for batch in reader:
            for i in range(0, batch.num_rows, RECORDS_PER_BATCH):
                yield (
                    batch.slice(i, RECORDS_PER_BATCH).to_pydict(),
                    path.stat().st_size if first else 0,
                )
                first = False


def _hub_dataset(source: SourceSpec) -> Any:
    import datasets

    datasets.disable_progress_bars()  # our own progress reporting speaks for the preparation
    try:
        return datasets.load_dataset(
            source.path, source.subset, split=source.split, streaming=source.streaming
        )
    except Exception as e:  # datasets raises many types; the user needs the first line only
        raise SourceError(
            "path", f"cannot load {source.path!r} from the Hugging Face hub: {first_line(e)}"
        ) from None


def _hub_shards(source: SourceSpec) -> list[InputShard]:
    dataset = _hub_dataset(source)
    if source.streaming:
        return [InputShard(None, i, i + 1) for i in range(dataset.num_shards)]
    rows = len(dataset)
    return [
        InputShard(None, start, min(start + HUB_ROWS_PER_SHARD, rows))
        for start in range(0, max(rows, 1), HUB_ROWS_PER_SHARD)
    ]


def _read_hub(source: SourceSpec, shard: InputShard) -> Iterator[tuple[Batch, int]]:
    dataset = _hub_dataset(source)
    try:
        if source.streaming:
            part = dataset.shard(num_shards=dataset.num_shards, index=shard.start)
            yield from _batches(iter(part), 0)
        else:
            for start in range(shard.start, shard.stop or len(dataset), RECORDS_PER_BATCH):
                yield dataset[start : min(start + RECORDS_PER_BATCH, shard.stop)], 0
    except SourceError:
        raise
    except Exception as e:
        raise SourceError("path", f"cannot read {source.path!r}: {first_line(e)}") from None


def _batches(records: Iterator[Any], size: int) -> Iterator[tuple[Batch, int]]:
    batch: list[Any] = []
    for record in records:
        batch.append(record)
        if len(batch) == RECORDS_PER_BATCH:
            yield _columns(batch), size
            batch, size = [], 0
    if batch or size:
        yield _columns(batch), size


def _columns(records: list[Any]) -> Batch:
    """Records (mappings) as columns; a column missing from some records holds None there."""
    names: dict[str, None] = {}
    for record in records:
        if not isinstance(record, dict):
            raise SourceError("path", f"records must be JSON objects, not {type(record).__name__}")
        names.update(dict.fromkeys(record))
    return {name: [record.get(name) for record in records] for name in names}
