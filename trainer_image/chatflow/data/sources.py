"""Load a source's raw records with Hugging Face `datasets`."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import datasets

from chatflow.spec import SourceSpec, SpecError

# File suffix -> `datasets` packaged builder.
FILE_TYPES = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",
}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

Records = datasets.Dataset | datasets.IterableDataset


class SourceError(SpecError):
    """A problem with one source's data; the pipeline prefixes the source's field path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


def local_files(source: SourceSpec, base_dir: Path) -> list[Path] | None:
    """The local files a source names, or None when its path is a hub dataset id."""
    path = local_path(source.path, base_dir)
    if glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_TYPES)
    elif path.exists():
        files = [path]
    elif HUB_ID.match(source.path) and not Path(source.path).suffix:
        return None
    else:
        raise SourceError("path", f"no such file or directory: {path}")
    files = [f for f in files if f.is_file()]
    if not files:
        raise SourceError("path", f"no data files ({', '.join(FILE_TYPES)}) in {path}")
    return files


def load_records(source: SourceSpec, base_dir: Path) -> Records:
    """The source's records, read eagerly or as a stream (`streaming: true`)."""
    datasets.disable_progress_bars()  # our own progress reporting speaks for the pipeline
    files = local_files(source, base_dir)
    try:
        if files is None:
            return datasets.load_dataset(
                source.path, source.subset, split=source.split, streaming=source.streaming
            )
        kinds = {FILE_TYPES.get(f.suffix) for f in files}
        if len(kinds) != 1 or None in kinds:
            names = ", ".join(sorted({f.suffix or f.name for f in files}))
            raise SourceError("path", f"mixed or unknown file types ({names})")
        return datasets.load_dataset(
            kinds.pop(),
            data_files=[str(f) for f in files],
            split="train",
            streaming=source.streaming,
        )
    except SourceError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the first line only
        where = "from the Hugging Face hub" if files is None else "from local files"
        raise SourceError("path", f"cannot load {source.path!r} {where}: {first_line(e)}") from None
