"""Pack token documents into fixed-length blocks: every training sample is exactly seqLength long.

Pretraining text is a continuous stream: documents are concatenated and cut every seqLength tokens,
so a long document continues in the next block. Instruction documents are never cut (a response
without its prompt teaches the wrong thing): they are placed whole, first-fit in order, and the rest
of a block is padding with mask 0; one longer than a block is truncated.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from chatflow.data.render import Document


class Packer:
    def __init__(self, seq_length: int, pad_id: int, split_documents: bool) -> None:
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.split_documents = split_documents
        self._ids: list[int] = []
        self._mask: list[int] = []
        self.truncated = 0  # documents cut to fit one block (instruction data only)

    def add(self, documents: Iterable[Document]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack more documents; return the blocks completed: ids (B, L), mask (B, L), lengths (B,).

        `lengths` counts the real (non-padding) tokens of each block.
        """
        if self.split_documents:
            return self._add_stream(documents)
        blocks: list[tuple[list[int], list[int]]] = []
        for ids, mask in documents:
            if len(ids) > self.seq_length:
                ids, mask = ids[: self.seq_length], mask[: self.seq_length]
                self.truncated += 1
            if len(self._ids) + len(ids) > self.seq_length:
                blocks.append((self._ids, self._mask))
                self._ids, self._mask = [], []
            self._ids += ids
            self._mask += mask
        return self._to_arrays(blocks)

    def _add_stream(
        self, documents: Iterable[Document]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        for ids, mask in documents:
            self._ids += ids
            self._mask += mask
        full = len(self._ids) // self.seq_length * self.seq_length
        ids = np.asarray(self._ids[:full], dtype=np.uint32).reshape(-1, self.seq_length)
        mask = np.asarray(self._mask[:full], dtype=np.uint8).reshape(-1, self.seq_length)
        del self._ids[:full], self._mask[:full]
        return ids, mask, np.full(len(ids), self.seq_length, dtype=np.int32)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The last, partly filled block (padded), if any."""
        blocks = [(self._ids, self._mask)] if self._ids else []
        self._ids, self._mask = [], []
        return self._to_arrays(blocks)

    def _to_arrays(
        self, blocks: list[tuple[list[int], list[int]]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.full((len(blocks), self.seq_length), self.pad_id, dtype=np.uint32)
        mask = np.zeros((len(blocks), self.seq_length), dtype=np.uint8)
        lengths = np.zeros(len(blocks), dtype=np.int32)
        for row, (block_ids, block_mask) in enumerate(blocks):
            ids[row, : len(block_ids)] = block_ids
            mask[row, : len(block_mask)] = block_mask
            lengths[row] = len(block_ids)
        return ids, mask, lengths
