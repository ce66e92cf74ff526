"""A source's packed blocks in the cache: prepared shard by shard, read back by ordinal.

Layout of one cache entry, `<cache>/<source>-<fingerprint>/`:
    shards.json            the source's input shards, in order (see sources.py)
    shard-000000/          one input shard packed:
        input_ids.bin      uint32 (blocks, seqLength)
        loss_mask.bin      uint8  (blocks, seqLength)
        lengths.bin        int32  (blocks,)  real (non-padding) tokens per block
        meta.json          its counts, written before the directory is renamed into place

Writers need no lock, so any number of processes or pods may prepare one entry at once, on a
shared volume whose locks cannot be trusted: each shard is written into a directory of its own
(named by host, pid and a random suffix) and renamed into place. A rename onto an existing shard
fails, and the loser drops its copy: shards are deterministic, so both copies are the same. A
shard directory is complete by construction; a killed writer leaves only a temporary directory,
which no reader opens. The filesystem must rename directories atomically (local disks, NFS,
CephFS, Lustre do; object-store FUSE mounts do not).

The source's blocks are its shards' blocks in shard order, over the prefix of shards prepared so
far; the first `held_out` are kept out of training for held-out evaluation. Its k-th training
sample, in the first pass, is block w*W + perm_w[k mod W] of window w = k div W (W =
SHUFFLE_WINDOW blocks; perm_w seeded by (seed, source, w)): preparing more of a source only adds
windows, so samples already planned keep their blocks. A source prepared whole repeats in later
passes, each a permutation of all its blocks seeded by (seed, source, epoch); its first pass ends
with the last, partial window.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chatflow.data.packing import Packer
from chatflow.data.render import Renderer
from chatflow.data.sources import InputShard, local_files, read_shard
from chatflow.spec import SourceSpec

FORMAT_VERSION = 2
IGNORE_INDEX = -100  # the label value Hugging Face causal-LM losses skip
SHUFFLE_WINDOW = 4096  # blocks shuffled together in a source's first pass
SHARDS_FILE = "shards.json"
STALE_SECONDS = 3600  # a temporary shard directory untouched this long was left by a dead writer


class SourceExhausted(Exception):
    """A source asked for more than it has: past `maxEpochs`, or past what is prepared."""


def entry_directory(
    source: SourceSpec, base_dir: Path, cache_dir: Path, tokenizer: Any, seq_length: int
) -> Path:
    return cache_dir / f"{source.name}-{fingerprint(source, base_dir, tokenizer, seq_length)}"


def fingerprint(source: SourceSpec, base_dir: Path, tokenizer: Any, seq_length: int) -> str:
    """Hash of everything that decides the packed blocks' content."""
    content = source.model_dump(mode="json", exclude={"name", "max_epochs"})
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


# --- writing ------------------------------------------------------------------------------------


def shard_directory(entry: Path, index: int) -> Path:
    return entry / f"shard-{index:06d}"


def write_listing(entry: Path, shards: list[InputShard]) -> None:
    """Record the input shards (once; every writer would write the same)."""
    if (entry / SHARDS_FILE).exists():
        return
    entry.mkdir(parents=True, exist_ok=True)
    tmp = entry / f".{SHARDS_FILE}.{_unique()}"
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, "shards": [s.to_dict() for s in shards]}))
    os.replace(tmp, entry / SHARDS_FILE)


def read_listing(entry: Path) -> list[InputShard] | None:
    try:
        listing = json.loads((entry / SHARDS_FILE).read_text())
    except FileNotFoundError:
        return None
    return [InputShard(**shard) for shard in listing["shards"]]


def read_shard_meta(entry: Path, index: int) -> dict[str, Any] | None:
    """A prepared shard's counts, or None when it is not (yet) prepared."""
    try:
        return json.loads((shard_directory(entry, index) / "meta.json").read_text())
    except FileNotFoundError:
        return None


def write_shard(
    entry: Path,
    index: int,
    shard: InputShard,
    source: SourceSpec,
    base_dir: Path,
    tokenizer: Any,
    seq_length: int,
) -> dict[str, Any]:
    """Tokenize and pack input shard `index` into the entry, unless it is there; its counts."""
    done = read_shard_meta(entry, index)
    if done is not None:
        return done
    final = shard_directory(entry, index)
    tmp = entry / f".{final.name}.tmp-{_unique()}"
    tmp.mkdir(parents=True)
    try:
        meta = _pack(shard, source, base_dir, tokenizer, seq_length, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another writer renamed its (identical) copy first
            if read_shard_meta(entry, index) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def remove_abandoned(entry: Path, now: float | None = None) -> None:
    """Delete temporary shard directories that no writer has touched for STALE_SECONDS."""
    now = time.time() if now is None else now
    for tmp in entry.glob(".shard-*.tmp-*"):
        try:
            touched = max([p.stat().st_mtime for p in tmp.iterdir()] + [tmp.stat().st_mtime])
        except FileNotFoundError:
            continue  # renamed or removed meanwhile
        if now - touched > STALE_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


def _unique() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pack(
    shard: InputShard,
    source: SourceSpec,
    base_dir: Path,
    tokenizer: Any,
    seq_length: int,
    out: Path,
) -> dict[str, Any]:
    render = Renderer(source, tokenizer)
    pad_id = tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else tokenizer.eos_token_id or 0
    packer = Packer(seq_length, pad_id, split_documents=source.kind != "instruction")
    documents = blocks = tokens = read = 0
    with (
        open(out / "input_ids.bin", "wb") as ids_file,
        open(out / "loss_mask.bin", "wb") as mask_file,
        open(out / "lengths.bin", "wb") as lengths_file,
    ):

        def write(packed: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            nonlocal blocks, tokens
            ids, mask, lengths = packed
            ids_file.write(ids.tobytes())
            mask_file.write(mask.tobytes())
            lengths_file.write(lengths.tobytes())
            blocks += len(ids)
            tokens += int(lengths.sum())

        for batch, size in read_shard(source, base_dir, shard):
            rendered = render(batch)
            documents += len(rendered)
            read += size
            write(packer.add(rendered))
        write(packer.finish())
        for f in (ids_file, mask_file, lengths_file):  # on disk before the rename publishes it
            f.flush()
            os.fsync(f.fileno())
    return {
        "input": shard.to_dict(),
        "documents": documents,
        "blocks": blocks,
        "tokens": tokens,
        "truncated_documents": packer.truncated,
        "read_bytes": read,
        "format": FORMAT_VERSION,
    }


# --- reading ------------------------------------------------------------------------------------


@dataclass
class PackedSource:
    """The prepared prefix of a source's shards, read by block and by sample ordinal."""

    name: str
    directory: Path
    seq_length: int
    shard_blocks: list[int]  # blocks of each prepared shard, in order
    complete: bool  # every shard of the source is prepared
    documents: int
    max_epochs: float | None
    seed: int
    held_out: int = 0
    _offsets: np.ndarray | None = field(default=None, repr=False)  # blocks before each shard's end
    _maps: dict[tuple[int, str], np.ndarray] = field(default_factory=dict, repr=False)
    _permutations: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        source: SourceSpec,
        entry: Path,
        seq_length: int,
        seed: int,
        held_out: int = 0,
    ) -> PackedSource:
        """The longest prefix of prepared shards (a missing shard ends it)."""
        listing = read_listing(entry) or []
        metas = []
        for index in range(len(listing)):
            meta = read_shard_meta(entry, index)
            if meta is None:
                break
            metas.append(meta)
        return cls(
            name=source.name,
            directory=entry,
            seq_length=seq_length,
            shard_blocks=[m["blocks"] for m in metas],
            complete=bool(listing) and len(metas) == len(listing),
            documents=sum(m["documents"] for m in metas),
            max_epochs=source.max_epochs,
            seed=seed,
            held_out=held_out,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (to dataloader workers) without the memory maps: each process maps its own."""
        return self.__dict__ | {"_maps": {}, "_permutations": {}}

    @property
    def blocks(self) -> int:
        """Prepared blocks, held-out ones included."""
        return sum(self.shard_blocks)

    @property
    def num_blocks(self) -> int:
        """Training blocks prepared (one epoch, when the source is complete)."""
        return max(self.blocks - self.held_out, 0)

    @property
    def held_out_blocks(self) -> range:
        return range(min(self.held_out, self.blocks))

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens of every prepared block."""
        parts = [self._array(i, "lengths.bin") for i in range(len(self.shard_blocks))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    @property
    def tokens(self) -> int:
        """Real tokens in the prepared training blocks."""
        return int(self.lengths[self.held_out :].sum())

    def covers(self, samples: int) -> bool:
        """Whether `samples` first-pass samples can be read: their windows are prepared."""
        return self.complete or self.num_blocks >= blocks_needed(samples)

    def example(self, block: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Block `block` as (input ids, labels with IGNORE_INDEX where not trained, real tokens)."""
        if self._offsets is None:
            self._offsets = np.cumsum(self.shard_blocks)
        shard = int(np.searchsorted(self._offsets, block, side="right"))
        row = block - (int(self._offsets[shard - 1]) if shard else 0)
        ids = self._array(shard, "input_ids.bin")[row].astype(np.int64)
        labels = np.where(self._array(shard, "loss_mask.bin")[row] > 0, ids, IGNORE_INDEX)
        return ids, labels, int(self._array(shard, "lengths.bin")[row])

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._maps:
            path = shard_directory(self.directory, shard) / name
            dtype = {"input_ids.bin": np.uint32, "loss_mask.bin": np.uint8}.get(name, np.int32)
            if path.stat().st_size == 0:  # np.memmap refuses empty files
                data = np.zeros(0, dtype=dtype)
            else:
                data = np.memmap(path, dtype=dtype, mode="r")
            self._maps[key] = data if name == "lengths.bin" else data.reshape(-1, self.seq_length)
        return self._maps[key]

    def block_of(self, ordinal: int) -> int:
        """Which block the source's `ordinal`-th sample is."""
        blocks = self.num_blocks
        if self.complete and blocks == 0:
            raise SourceExhausted(f"source {self.name!r} has no data")
        if self.complete and self.max_epochs is not None and ordinal >= self.max_epochs * blocks:
            raise SourceExhausted(
                f"source {self.name!r} exhausted: sample {ordinal + 1} of it would exceed "
                f"maxEpochs {self.max_epochs:g} of its {blocks} samples"
            )
        if ordinal < blocks or not self.complete:  # the first pass, window by window
            window, position = divmod(ordinal, SHUFFLE_WINDOW)
            start = window * SHUFFLE_WINDOW
            size = min(SHUFFLE_WINDOW, blocks - start)
            if size < SHUFFLE_WINDOW and not self.complete:
                raise SourceExhausted(
                    f"source {self.name!r}: sample {ordinal + 1} of it is past the "
                    f"{blocks} prepared samples; run `chatflow prepare` for this run"
                )
            return self.held_out + start + int(self._permutation(0, window, size)[position])
        epoch, position = divmod(ordinal, blocks)
        return self.held_out + int(self._permutation(epoch, 0, blocks)[position])

    def _permutation(self, epoch: int, window: int, size: int) -> np.ndarray:
        key = (epoch, window)
        if key not in self._permutations:
            if len(self._permutations) > 2:  # readers move forward: keep the current ones only
                self._permutations.pop(min(self._permutations))
            seed = [self.seed, zlib.crc32(self.name.encode()), epoch, window]
            self._permutations[key] = np.random.default_rng(seed).permutation(size)
        return self._permutations[key]


def blocks_needed(samples: int) -> int:
    """Training blocks a first pass of `samples` samples reads: whole shuffle windows."""
    return -(-samples // SHUFFLE_WINDOW) * SHUFFLE_WINDOW
