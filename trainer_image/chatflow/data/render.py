"""Turn a batch of raw records into token documents, each with a loss mask.

A document is (token ids, mask); mask[i] = 1 when token i is a training target. Documents start with
BOS (when the tokenizer has one) whose mask is 0: after packing, predicting a document's first token
from the end of the previous document would teach nothing.
"""

from __future__ import annotations

import functools
from typing import Any

from chatflow.data.sources import SourceError
from chatflow.spec import SourceSpec

Document = tuple[list[int], list[int]]
Batch = dict[str, list[Any]]


class Renderer:
    """Renders records of one source; call it on a batch (column name -> list of values)."""

    def __init__(self, source: SourceSpec, tokenizer: Any) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if source.kind == "instruction":
            self.chat_template = source.chat_template or tokenizer.chat_template
            if not self.chat_template:
                raise SourceError("chatTemplate", "the tokenizer has no chat template; set one")

    def __call__(self, batch: Batch) -> list[Document]:
        if self.source.kind == "pretrain":
            return self._plain(_column(batch, self.source.text_field, "textField"))
        if self.source.kind == "parallel":
            return self._plain(self._parallel_texts(batch))
        return self._instructions(batch)

    def _plain(self, texts: list[str]) -> list[Document]:
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            return []
        documents = []
        for ids in self._encode(texts):
            tokens = self.prefix + ids + self.suffix
            mask = [1] * len(tokens)
            mask[0] = 0
            documents.append((tokens, mask))
        return documents

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens: what the tokenizer's __call__ returns.

        Straight through a fast tokenizer's backend when it neither truncates nor pads (as
        transformers' __call__ sets it up), with `encode_batch_fast`, which computes no offsets:
        this is most of the preparation's time, and the wrapper and the offsets add ~10% to it.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
            return encoded["input_ids"]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def _parallel_texts(self, batch: Batch) -> list[str]:
        fields, (first, second) = self.source.fields, self.source.languages  # type: ignore[misc]
        assert fields is not None
        sources = _column(batch, fields.source, "fields.source")
        targets = _column(batch, fields.target, "fields.target")
        directions = [(first, second, False)]
        if self.source.directions == "both":
            directions.append((second, first, True))
        texts = []
        for src_text, tgt_text in zip(sources, targets, strict=True):
            if not (src_text and tgt_text):
                continue
            for src_lang, tgt_lang, swap in directions:
                src, tgt = (tgt_text, src_text) if swap else (src_text, tgt_text)
                texts.append(
                    self.source.template.format(
                        source=src, target=tgt, source_language=src_lang, target_language=tgt_lang
                    )
                )
        return texts

    def _instructions(self, batch: Batch) -> list[Document]:
        conversations = (
            _alpaca_messages(batch)
            if self.source.format == "alpaca"
            else _column(batch, "messages")
        )
        texts, spans = [], []
        for messages in conversations:
            text, assistant_spans = self._render_chat(messages)
            texts.append(text)
            spans.append(assistant_spans)
        if not texts:
            return []
        encoded = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_offsets_mapping=True,
        )
        documents = []
        for ids, offsets, assistant in zip(
            encoded["input_ids"], encoded["offset_mapping"], spans, strict=True
        ):
            mask = [0] * len(offsets)
            for a, b in assistant:  # a token is trained on if it starts in an assistant span
                mask = [m | (a <= start < b) for m, (start, _) in zip(mask, offsets, strict=True)]
            documents.append((ids, mask))
        return documents

    def _render_chat(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans of its assistant turns.

        An assistant turn's span is what rendering messages[:i+1] adds to rendering messages[:i]
        with a generation prompt; only those characters are trained on.
        """
        if not messages or any(not isinstance(m, dict) or "role" not in m for m in messages):
            raise SourceError("format", "messages must be a list of {role, content} mappings")

        @functools.cache  # the whole conversation usually renders as its last assistant turn
        def render(upto: int, prompt: bool) -> str:
            return self.tokenizer.apply_chat_template(
                messages[:upto],
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=prompt,
            )

        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, after = render(i, True), render(i + 1, False)
            if not after.startswith(before):
                raise SourceError(
                    "chatTemplate",
                    "a conversation prefix does not render as a prefix of the whole; "
                    "cannot tell prompt from response",
                )
            spans.append((len(before), len(after)))
        return render(len(messages), False), spans


def _column(batch: Batch, name: str, field: str = "format") -> list[Any]:
    """A column of the batch; a dotted name such as `translation.zh` reaches into a nested one."""
    if name in batch:
        return batch[name]
    head, *keys = name.split(".")
    if not keys or head not in batch:
        raise SourceError(field, f"no column {name!r} in the data (columns: {', '.join(batch)})")
    values = batch[head]
    for key in keys:
        values = [value.get(key) if isinstance(value, dict) else None for value in values]
    return values


def _alpaca_messages(batch: Batch) -> list[list[dict[str, str]]]:
    instructions, outputs = _column(batch, "instruction"), _column(batch, "output")
    inputs = batch.get("input") or [""] * len(instructions)
    conversations = []
    for instruction, extra, output in zip(instructions, inputs, outputs, strict=True):
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        conversations.append(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        )
    return conversations
