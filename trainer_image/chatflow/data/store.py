"""A source's packed blocks, tokenized once and cached on disk, read back by ordinal.

Layout of one cache entry, `<cache>/<source>-<fingerprint>/`:
    input_ids.bin  uint32 (blocks, seqLength)
    loss_mask.bin  uint8  (blocks, seqLength)
    lengths.bin    int32  (blocks,)  real (non-padding) tokens per block
    meta.json      written last; its presence marks the entry complete

An entry is built in a temporary directory and renamed into place, so a preparation that was killed
half-way is never read. A lock file lets concurrent ranks on one node build it once.

The last `held_out` blocks are kept out of training for held-out evaluation. The source's k-th
training sample is block perm_e[k mod B] of epoch e = k div B (B: training blocks), where perm_e is
a permutation seeded by (seed, source, epoch): every epoch visits every block once, in a new order,
and any rank can find any ordinal without reading the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from chatflow.data.packing import Packer
from chatflow.data.render import Renderer
from chatflow.data.sources import SourceError, load_records, local_files
from chatflow.spec import SourceSpec

FORMAT_VERSION = 1
IGNORE_INDEX = -100  # the label value Hugging Face causal-LM losses skip
RECORDS_PER_BATCH = 1000


class SourceExhausted(Exception):
    """The schedule asks a source for more passes than its `maxEpochs` allows."""


@dataclass
class PackedSource:
    name: str
    directory: Path
    seq_length: int
    documents: int
    max_epochs: float | None
    seed: int
    held_out: int = 0
    _permutations: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls, directory: Path, max_epochs: float | None, seed: int, held_out: int = 0
    ) -> PackedSource:
        meta = json.loads((directory / "meta.json").read_text())
        return cls(
            name=meta["source"],
            directory=directory,
            seq_length=meta["seq_length"],
            documents=meta["documents"],
            max_epochs=max_epochs,
            seed=seed,
            held_out=held_out,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (to dataloader workers) without the memory maps: each process maps its own."""
        state = self.__dict__.copy()
        for name in ("input_ids", "loss_mask", "lengths"):
            state.pop(name, None)
        return state

    @cached_property
    def input_ids(self) -> np.ndarray:
        return self._array("input_ids.bin", np.uint32, 2)

    @cached_property
    def loss_mask(self) -> np.ndarray:
        return self._array("loss_mask.bin", np.uint8, 2)

    @cached_property
    def lengths(self) -> np.ndarray:
        return self._array("lengths.bin", np.int32, 1)

    @property
    def num_blocks(self) -> int:
        """Training blocks: one epoch."""
        return max(len(self.lengths) - self.held_out, 0)

    @property
    def held_out_blocks(self) -> range:
        return range(self.num_blocks, len(self.lengths))

    @property
    def tokens(self) -> int:
        """Real tokens in one epoch of training blocks."""
        return int(self.lengths[: self.num_blocks].sum())

    def _array(self, name: str, dtype: type, ndim: int) -> np.ndarray:
        path = self.directory / name
        if path.stat().st_size == 0:  # np.memmap refuses empty files
            return np.zeros((0, self.seq_length) if ndim == 2 else (0,), dtype=dtype)
        data = np.memmap(path, dtype=dtype, mode="r")
        return data.reshape(-1, self.seq_length) if ndim == 2 else data

    def example(self, block: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Block `block` as (input ids, labels with IGNORE_INDEX where not trained, real tokens)."""
        ids = self.input_ids[block].astype(np.int64)
        labels = np.where(self.loss_mask[block] > 0, ids, IGNORE_INDEX)
        return ids, labels, int(self.lengths[block])

    def block_of(self, ordinal: int) -> int:
        """Which block the source's `ordinal`-th sample is."""
        blocks = self.num_blocks
        if blocks == 0:
            raise SourceExhausted(f"source {self.name!r} has no data")
        if self.max_epochs is not None and ordinal >= self.max_epochs * blocks:
            raise SourceExhausted(
                f"source {self.name!r} exhausted: sample {ordinal + 1} of it would exceed "
                f"maxEpochs {self.max_epochs:g} of its {blocks} samples"
            )
        epoch, position = divmod(ordinal, blocks)
        return int(self._permutation(epoch)[position])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:  # readers move forward: keep the current epochs only
                self._permutations.pop(min(self._permutations))
            key = [self.seed, zlib.crc32(self.name.encode()), epoch]
            self._permutations[epoch] = np.random.default_rng(key).permutation(self.num_blocks)
        return self._permutations[epoch]


def fingerprint(source: SourceSpec, base_dir: Path, tokenizer: Any, seq_length: int) -> str:
    """Hash of everything that decides the packed blocks' content."""
    content = source.model_dump(mode="json", exclude={"name", "max_epochs", "streaming"})
    files = local_files(source, base_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    key = {
        "format": FORMAT_VERSION,
        "source": content,
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files or []],
        "tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest(),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": tokenizer.chat_template,
        "seq_length": seq_length,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def prepare_source(
    source: SourceSpec,
    base_dir: Path,
    cache_dir: Path,
    tokenizer: Any,
    seq_length: int,
    seed: int,
    held_out: int = 0,
) -> PackedSource:
    """Tokenize and pack a source into the cache, unless an identical entry exists; open it."""
    key = fingerprint(source, base_dir, tokenizer, seq_length)
    directory = cache_dir / f"{source.name}-{key}"
    if not (directory / "meta.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir / f".{directory.name}.lock"):
            if not (directory / "meta.json").exists():
                _build(source, base_dir, directory, tokenizer, seq_length)
    return PackedSource.open(directory, source.max_epochs, seed, held_out)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(
    source: SourceSpec, base_dir: Path, directory: Path, tokenizer: Any, seq_length: int
) -> None:
    """Write the entry into a temporary directory, then rename it into place."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write_blocks(source, base_dir, tmp, tokenizer, seq_length)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete entry from elsewhere
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_blocks(
    source: SourceSpec, base_dir: Path, out: Path, tokenizer: Any, seq_length: int
) -> dict[str, Any]:
    render = Renderer(source, tokenizer)
    pad_id = tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else tokenizer.eos_token_id or 0
    packer = Packer(seq_length, pad_id, split_documents=source.kind != "instruction")
    documents = blocks = 0
    records = load_records(source, base_dir)
    with (
        open(out / "input_ids.bin", "wb") as ids_file,
        open(out / "loss_mask.bin", "wb") as mask_file,
        open(out / "lengths.bin", "wb") as lengths_file,
    ):

        def write(packed: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            nonlocal blocks
            ids, mask, lengths = packed
            ids_file.write(ids.tobytes())
            mask_file.write(mask.tobytes())
            lengths_file.write(lengths.tobytes())
            blocks += len(ids)

        try:
            for batch in records.iter(batch_size=RECORDS_PER_BATCH):
                rendered = render(batch)
                documents += len(rendered)
                write(packer.add(rendered))
        except SourceError:
            raise
        except Exception as e:  # unreadable rows surface here, possibly deep in a stream
            raise SourceError("path", f"cannot read records: {e}") from None
        write(packer.finish())
    return {
        "source": source.name,
        "seq_length": seq_length,
        "documents": documents,
        "blocks": blocks,
        "truncated_documents": packer.truncated,
        "format": FORMAT_VERSION,
    }
