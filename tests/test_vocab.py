"""Vocabulary extension, on the LLaMA-style tokenizer in each form a user meets it.

The tokenizer is mistral-common's 32k SentencePiece model (LLaMA-2's kind): converted by
transformers' LlamaTokenizer (the tiny example's), loaded from a bare tokenizer.model (whatever the
installed transformers makes of it), in LLaMA-2's hub layout (tokenizer.json with a Prepend
normalizer, tokenizer_config.json naming LlamaTokenizer), and with the two "legacy" pipelines
that put a prefix space before every stretch between added tokens: the Prepend normalizer loaded
as is, and transformers 5.24's Metaspace `prepend_scheme: always`.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from chatflow.spec import SpecError
from chatflow.vocab import (
    NewToken,
    TokenizerError,
    extend_embeddings,
    extend_tokenizer,
    prefix_text_start_only,
    read_tokens_file,
)

# Not in the 32k vocabulary: each splits into its three UTF-8 byte pieces.
UNKNOWN = ["鑫", "犇", "曌"]
# Already single tokens.
KNOWN = ["中", "国", "。"]
KINDS = ["llama", "spm", "llama2-hub", "prepend", "always"]
# New tokens at the start, after spaces, between known characters, before Latin letters.
TEXT = "鑫我们鑫犇，中国曌。 鑫 a鑫b 曌"


def byte_pieces(tokenizer: PreTrainedTokenizerBase, char: str) -> tuple[int, ...]:
    return tuple(tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in char.encode()]))


def llama2_hub_layout(llama_tokenizer_dir: Path, dest: Path) -> Path:
    """The tokenizer in meta-llama/Llama-2-7b-hf's files: tokenizer.model, tokenizer.json with
    LLaMA-2's pipeline (a Prepend normalizer, no pre-tokenizer), its tokenizer_config.json."""
    dest.mkdir()
    spm = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    shutil.copyfile(str(spm), dest / "tokenizer.model")
    pipeline = json.loads((llama_tokenizer_dir / "tokenizer.json").read_text())
    pipeline["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    pipeline["pre_tokenizer"] = None
    (dest / "tokenizer.json").write_text(json.dumps(pipeline, ensure_ascii=False))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def load_tokenizer(directory: Path, kind: str = "llama") -> PreTrainedTokenizerBase:
    """The fixture tokenizer (`directory`, saved by LlamaTokenizer) in the form `kind`."""
    if kind == "llama":
        return AutoTokenizer.from_pretrained(directory)
    if kind == "spm":
        bare = directory.parent / f"{directory.name}-spm"
        if not bare.exists():
            bare.mkdir()
            spm = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
            shutil.copyfile(str(spm), bare / "tokenizer.model")
        return AutoTokenizer.from_pretrained(bare)
    if kind == "llama2-hub":
        hub = directory.parent / f"{directory.name}-llama2"
        return AutoTokenizer.from_pretrained(
            hub if hub.exists() else llama2_hub_layout(directory, hub)
        )
    # tokenizer.json as it is, with no model-specific class rebuilding its pipeline.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    backend = tokenizer.backend_tokenizer
    if kind == "prepend":  # LLaMA-2's tokenizer.json
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        backend.pre_tokenizer = None
    elif kind == "always":  # what transformers 5.24 builds from a bare tokenizer.model
        backend.normalizer = normalizers.Sequence(
            [normalizers.Replace(" ", "▁"), normalizers.Replace(Regex("\\A▁"), "▁▁")]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(prepend_scheme="always", split=False)]
        )
    else:
        raise ValueError(kind)
    return tokenizer


def tiny_model(vocab_size: int, *, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tokenizer(llama_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(llama_tokenizer_dir)


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_are_the_byte_pieces_without_a_prefix_space(llama_tokenizer_dir, kind):
    tokenizer = load_tokenizer(llama_tokenizer_dir, kind)
    original = [byte_pieces(tokenizer, char) for char in UNKNOWN]

    new_tokens = extend_tokenizer(tokenizer, UNKNOWN)

    assert [t.token for t in new_tokens] == UNKNOWN
    assert [t.pieces for t in new_tokens] == original
    assert [t.id for t in new_tokens] == [32000, 32001, 32002]
    assert len(tokenizer) == 32003


@pytest.mark.parametrize("kind", KINDS)
def test_new_tokens_encode_as_one_id_decode_back_and_add_no_spaces(llama_tokenizer_dir, kind):
    tokenizer = load_tokenizer(llama_tokenizer_dir, kind)
    new_tokens = extend_tokenizer(tokenizer, UNKNOWN)

    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # Each occurrence is one new id, and no byte piece is left of any.
    assert not set(ids) & {p for t in new_tokens for p in t.pieces}
    assert [i for i in ids if i >= 32000] == [
        next(t.id for t in new_tokens if t.token == c) for c in TEXT if c in UNKNOWN
    ]
    assert tokenizer.decode(ids) == TEXT
    # A "▁" for each space of the text, none before a stretch that follows a new token.
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert sum(token.count("▁") for token in tokens) == TEXT.count(" ")
    assert not any(token in tokenizer.all_special_tokens for token in UNKNOWN)


@pytest.mark.parametrize("kind", KINDS)
def test_text_without_new_tokens_encodes_as_before(llama_tokenizer_dir, kind):
    tokenizer = load_tokenizer(llama_tokenizer_dir, kind)
    text = "The quick brown fox, 中国。\nSecond line"
    before = tokenizer.encode(text, add_special_tokens=False)

    extend_tokenizer(tokenizer, UNKNOWN)

    assert tokenizer.encode(text, add_special_tokens=False) == before


def test_only_legacy_pipelines_are_changed(llama_tokenizer_dir):
    llama = load_tokenizer(llama_tokenizer_dir, "llama")
    assert not prefix_text_start_only(llama)
    legacy = load_tokenizer(llama_tokenizer_dir, "always")
    assert prefix_text_start_only(legacy)
    assert not prefix_text_start_only(legacy)


def test_tokenizer_that_still_inserts_spaces_is_refused(llama_tokenizer_dir):
    tokenizer = load_tokenizer(llama_tokenizer_dir, "prepend")
    # A prefix the rewrite does not know: each stretch would still start with "▁".
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁▁"), normalizers.Replace(" ", "▁")]
    )

    with pytest.raises(TokenizerError, match="would insert spaces"):
        extend_tokenizer(tokenizer, UNKNOWN)
    assert len(tokenizer) == 32000


def test_known_and_repeated_tokens_are_skipped(tokenizer):
    new_tokens = extend_tokenizer(tokenizer, [*KNOWN, "鑫", "鑫", "<s>"])

    assert [t.token for t in new_tokens] == ["鑫"]
    assert len(tokenizer) == 32001
    assert extend_tokenizer(tokenizer, ["鑫", *KNOWN]) == []


# --- embeddings --------------------------------------------------------------------------------


def assert_rows_are_piece_means(
    weight: torch.Tensor, old: torch.Tensor, new_tokens: list[NewToken]
) -> None:
    for t in new_tokens:
        row = weight[t.id]
        torch.testing.assert_close(row, old[list(t.pieces)].mean(dim=0))
        # A vector mean, not the scalar of torch.cat(rows).mean(0) broadcast over the row.
        assert row.unique().numel() == row.numel()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_new_rows_are_the_mean_of_their_pieces(tokenizer, tied):
    model = tiny_model(len(tokenizer), tied=tied)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()

    new_tokens = extend_tokenizer(tokenizer, UNKNOWN)
    extend_embeddings(model, new_tokens)

    input_weight = model.get_input_embeddings().weight
    output_weight = model.get_output_embeddings().weight
    assert input_weight.shape == (len(tokenizer), 32)
    assert output_weight.shape == (len(tokenizer), 32)
    assert model.config.vocab_size == len(tokenizer)
    assert (output_weight is input_weight) == tied
    assert_rows_are_piece_means(input_weight, old_input, new_tokens)
    assert_rows_are_piece_means(output_weight, old_output, new_tokens)
    assert torch.equal(input_weight[:32000], old_input)
    assert torch.equal(output_weight[:32000], old_output)

    ids = tokenizer("我们鑫犇曌", return_tensors="pt").input_ids
    assert ids.max() >= 32000
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_padded_embeddings_are_reused_not_shrunk(tokenizer):
    model = tiny_model(32064)  # more rows than the tokenizer has tokens
    old = model.get_input_embeddings().weight.detach().clone()

    new_tokens = extend_tokenizer(tokenizer, UNKNOWN)
    extend_embeddings(model, new_tokens)

    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 32064
    assert model.config.vocab_size == 32064
    assert_rows_are_piece_means(weight, old, new_tokens)


def test_pieces_past_the_model_rows_are_refused(tokenizer):
    model = tiny_model(100)  # the byte pieces are ids 3 to 258
    with pytest.raises(ValueError, match="does not belong to this model"):
        extend_embeddings(model, extend_tokenizer(tokenizer, UNKNOWN))
    assert model.get_input_embeddings().weight.shape[0] == 100


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_keep_tokens_and_rows(llama_tokenizer_dir, kind, tmp_path):
    tokenizer = load_tokenizer(llama_tokenizer_dir, kind)
    model = tiny_model(len(tokenizer))
    new_tokens = extend_tokenizer(tokenizer, UNKNOWN)
    extend_embeddings(model, new_tokens)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)

    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)

    assert len(reloaded_tokenizer) == len(tokenizer)
    assert reloaded_tokenizer.convert_tokens_to_ids(UNKNOWN) == [t.id for t in new_tokens]
    assert reloaded_tokenizer.encode("鑫", add_special_tokens=False) == [new_tokens[0].id]
    ids = reloaded_tokenizer.encode(TEXT, add_special_tokens=False)
    assert ids == tokenizer.encode(TEXT, add_special_tokens=False)
    assert reloaded_tokenizer.decode(ids) == TEXT
    assert reloaded.config.vocab_size == len(tokenizer)
    for name in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(reloaded, name)().weight, getattr(model, name)().weight)


# --- tokens file -------------------------------------------------------------------------------


def test_read_tokens_file(tmp_path):
    path = tmp_path / "tokens.txt"
    # A byte-order mark, CRLF line ends, blank lines, padding and a repeat.
    path.write_bytes("\ufeff鑫\r\n\n  犇 \r\n鑫\n曌\n\n".encode())

    assert read_tokens_file(path) == ["鑫", "犇", "曌"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("鑫\n犇 曌\n".encode(), r":2: token '犇 曌' contains U\+0020"),
        ("鑫\n犇\t\n曌\u2028晶\n".encode(), r":3: token '曌\\u2028晶' contains U\+2028"),
        (b"\xe9\x91\xab\n\xff\n", ":2: not valid UTF-8"),
        (b"\n \n", ": no tokens"),
    ],
    ids=["space", "separator", "utf8", "empty"],
)
def test_bad_tokens_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "tokens.txt"
    path.write_bytes(content)

    with pytest.raises(SpecError, match=message) as error:
        read_tokens_file(path)
    assert str(error.value).startswith(f"{path}:")
    assert "\n" not in str(error.value)


def test_missing_tokens_file(tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(SpecError, match="cannot read") as error:
        read_tokens_file(path)
    assert str(error.value).startswith(f"{path}:")
