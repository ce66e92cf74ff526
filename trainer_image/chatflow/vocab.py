"""Vocabulary extension: add tokens (ChatFlow: 8,076 Chinese characters) to a tokenizer and model.

A character that LLaMA-2's tokenizer does not know is split into UTF-8 byte pieces (byte fallback),
so Chinese text costs several tokens per character. Each character becomes one new token, and its
embedding rows start as the mean of the rows of the pieces it used to split into: a start that
carries what the model learned about those pieces, where random rows would carry nothing.

Typical use, before the model is wrapped for distributed training:

    new_tokens = extend_tokenizer(tokenizer, read_tokens_file(path))
    extend_embeddings(model, new_tokens)
"""

from __future__ import annotations

import contextlib
import copy
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chatflow.spec import SpecError

# SentencePiece's word-boundary mark: a space, or the prefix it adds at the start of a text.
_PREFIX_SPACE = "▁"


class TokenizerError(ValueError):
    """The tokenizer cannot take new tokens as they are; the caller names the spec field."""


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token added to the vocabulary."""

    token: str
    id: int
    pieces: tuple[int, ...]
    """The ids the original tokenizer split the token into, inside running text."""


def read_tokens_file(path: str | Path) -> list[str]:
    """Read a UTF-8 file of one token per line, dropping blank lines and repeated tokens.

    Whitespace at either end of a line is ignored; whitespace or a control character inside a token
    is an error, since it usually means two tokens were put on one line. Raises SpecError with a
    one-line message naming the file and line.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    try:
        # utf-8-sig: a byte-order mark left by an editor must not become part of the first token.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not valid UTF-8") from None

    tokens: dict[str, None] = {}
    # split("\n") rather than splitlines(): the latter also breaks at Unicode separators such as
    # U+2028, which would hide them instead of reporting them.
    for number, line in enumerate(text.split("\n"), start=1):
        token = line.strip()
        bad = next((c for c in token if c.isspace() or unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise SpecError(
                f"{path}:{number}: token {token!r} contains U+{ord(bad):04X}; "
                "expected one token per line"
            )
        if token:
            tokens.setdefault(token)
    if not tokens:
        raise SpecError(f"{path}: no tokens")
    return list(tokens)


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[str]) -> list[NewToken]:
    """Add `tokens` to the tokenizer as normal (non-special) tokens.

    Tokens the vocabulary already has are skipped, as are repeats. Returns the added tokens in id
    order, each with the pieces the tokenizer split it into before, for `extend_embeddings`. A
    SentencePiece tokenizer that puts its prefix space before every stretch of text between added
    tokens is first changed to put it only at the start of a text (`prefix_text_start_only`).
    Raises TokenizerError when the tokenizer cannot take the tokens.
    """
    vocab = tokenizer.get_vocab()
    candidates = [token for token in dict.fromkeys(tokens) if token not in vocab]
    if not candidates:
        return []
    prefix_text_start_only(tokenizer)
    pieces = _pieces_in_text(tokenizer, candidates)
    # normalized=False: a token matches exactly its own text. Matched after normalization, a
    # fullwidth "，" would (under NFKC) also capture every ASCII ",".
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in candidates])
    ids = tokenizer.convert_tokens_to_ids(candidates)
    return [
        NewToken(token, id_, tuple(split))
        for token, id_, split in zip(candidates, ids, pieces, strict=True)
    ]


def prefix_text_start_only(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Make a SentencePiece-style tokenizer add its prefix space at the start of a text only.

    Added tokens split a text into stretches, and each stretch is normalized and pre-tokenized on
    its own. A tokenizer in SentencePiece's "legacy" mode prefixes every stretch with "▁", so after
    an added token "鑫" the text "好" would become "▁好": every new token would insert a space.
    Two forms of it are met: a `Prepend("▁")` normalizer (LLaMA-2's tokenizer.json, loaded as is)
    and a Metaspace pre-tokenizer with `prepend_scheme: always` (what transformers 5.24 builds from
    a bare tokenizer.model). Both become Metaspace with `prepend_scheme: first`, which is what
    transformers' LlamaTokenizer builds (`legacy=False`). Text without added tokens encodes as
    before, but for a text that starts with a space (one "▁" fewer). Returns whether it changed.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False  # a Python tokenizer: the check in `_pieces_in_text` speaks for it
    pipeline = json.loads(backend.to_str())
    rewritten = text_start_prefix_pipeline(pipeline)
    if rewritten == pipeline:
        return False
    # Tokenizer.from_str builds the components; assigning them keeps the tokenizer object, whose
    # vocabulary, added tokens and post-processor stay as they are.
    components = Tokenizer.from_str(json.dumps(rewritten))
    backend.normalizer = components.normalizer
    backend.pre_tokenizer = components.pre_tokenizer
    return True


def text_start_prefix_pipeline(pipeline: dict) -> dict:
    """`pipeline` (a tokenizer.json) with its prefix space only at the start of a text."""
    pipeline = copy.deepcopy(pipeline)
    normalizers = _flatten(pipeline.get("normalizer"), "normalizers")
    metaspaces = [
        p
        for p in _flatten(pipeline.get("pre_tokenizer"), "pretokenizers")
        if p["type"] == "Metaspace"
    ]
    prepends = [n for n in normalizers if n["type"] == "Prepend" and n["prepend"] == _PREFIX_SPACE]
    legacy = [m for m in metaspaces if m.get("prepend_scheme") == "always"]
    if not prepends and not legacy:
        return pipeline
    # Also dropped: transformers' Replace("\A▁" -> "▁▁"), which stands in for SentencePiece's
    # prefix before a leading space and would, after an added token, turn " 好" into "▁▁好".
    kept = [n for n in normalizers if n not in prepends and not _doubles_leading_prefix(n)]
    pipeline["normalizer"] = {"type": "Sequence", "normalizers": kept} if kept else None
    for metaspace in legacy:
        metaspace["prepend_scheme"] = "first"
    if prepends and not metaspaces:
        first = {
            "type": "Metaspace",
            "replacement": _PREFIX_SPACE,
            "prepend_scheme": "first",
            "split": False,
        }
        rest = _flatten(pipeline.get("pre_tokenizer"), "pretokenizers")
        pipeline["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [first, *rest]}
    return pipeline


def _flatten(component: dict | None, key: str) -> list[dict]:
    """A normalizer or pre-tokenizer as a list of its parts (a Sequence's are nested)."""
    if component is None:
        return []
    if component["type"] == "Sequence":
        return [part for inner in component[key] for part in _flatten(inner, key)]
    return [component]


def _doubles_leading_prefix(normalizer: dict) -> bool:
    pattern = normalizer.get("pattern", {})
    return normalizer["type"] == "Replace" and pattern.get("Regex") == f"\\A{_PREFIX_SPACE}"


def _pieces_in_text(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> list[list[int]]:
    """The ids each token is split into where it occurs inside a text.

    Encoded alone, a token may get SentencePiece's prefix space: LLaMA-2's tokenizer gives
    "鑫" -> ["▁", <0xE9>, <0x91>, <0xAB>]. Inside a sentence there is no "▁", and averaging its row
    in would pull every new character toward "space". Metaspace's prepend_scheme="first" adds it
    only at the start of a text, so each token is encoded after a special token, whose id is then
    dropped.
    """
    if not tokenizer.all_special_tokens:
        raise TokenizerError("needs a special token to mark where a text starts")
    start = tokenizer.all_special_tokens[0]
    start_id = tokenizer.convert_tokens_to_ids(start)

    encoded = tokenizer([start + token for token in tokens], add_special_tokens=False)["input_ids"]
    result = []
    for token, ids in zip(tokens, encoded, strict=True):
        if ids[0] != start_id:
            raise TokenizerError(f"its special token {start!r} does not encode as one token")
        pieces = ids[1:]
        if not pieces:
            raise TokenizerError(f"token {token!r} encodes to no pieces")
        first = tokenizer.convert_ids_to_tokens(pieces[0])
        if first.startswith(_PREFIX_SPACE) and not token.startswith((" ", _PREFIX_SPACE)):
            # A pipeline `prefix_text_start_only` does not know (a Python tokenizer, or another
            # normalizer that adds "▁"): each new token would insert a space before the text after.
            raise TokenizerError(
                f"puts {_PREFIX_SPACE!r} before the text after an added token, so new tokens "
                "would insert spaces; save it with transformers' LlamaTokenizer (legacy=False)"
            )
        result.append(pieces)
    return result


def extend_embeddings(model: PreTrainedModel, new_tokens: Sequence[NewToken]) -> None:
    """Grow the model's token embeddings for `new_tokens` and initialise their rows.

    Each new row, in the input embedding and in the output embedding (LM head) when it is not tied
    to it, is the mean of the rows of the token's old pieces. config.vocab_size follows the new
    size. Under ZeRO-3, where the model was built partitioned (`zero.Init`), every rank calls
    this: the two matrices are gathered whole while their new rows are set, one at a time.
    """
    if not new_tokens:
        return
    old_rows = model.get_input_embeddings().num_embeddings  # weight.shape is 0 when partitioned
    pieces = torch.tensor([p for t in new_tokens for p in t.pieces])
    if pieces.max() >= old_rows:
        raise ValueError(
            f"a piece id ({int(pieces.max())}) is past the model's {old_rows} embedding rows: "
            "the tokenizer does not belong to this model"
        )
    ids = torch.tensor([t.id for t in new_tokens])
    counts = torch.tensor([len(t.pieces) for t in new_tokens])
    # Row i of `pieces` belongs to new token owner[i]: a segment mean is index_add_ then divide.
    owner = torch.repeat_interleave(torch.arange(len(new_tokens)), counts)

    # Some models have more rows than tokens (padded to a multiple of 64): the new ids may fall in
    # those unused rows, and the embeddings must not shrink.
    model.resize_token_embeddings(
        max(old_rows, int(ids.max()) + 1),
        # The default samples new rows from the old rows' distribution; they are overwritten below.
        mean_resizing=False,
    )
    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    with torch.no_grad():
        for weight in weights:
            with _whole(weight):
                device = weight.device
                # Sum in float32: averaging bf16 rows in bf16 would lose precision for no gain.
                sums = torch.zeros(
                    len(new_tokens), weight.shape[1], dtype=torch.float32, device=device
                )
                sums.index_add_(0, owner.to(device), weight[pieces.to(device)].float())
                means = sums / counts.to(device).unsqueeze(1)
                weight[ids.to(device)] = means.to(weight.dtype)


def _whole(weight: torch.nn.Parameter) -> contextlib.AbstractContextManager:
    """The weight whole inside the block. A ZeRO-3 partitioned one is gathered on every rank (so
    every rank computes the same rows), and rank 0's values are partitioned again after it."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
