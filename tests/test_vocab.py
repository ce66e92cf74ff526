from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import normalizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
)

from chatflow.spec import SpecError
from chatflow.vocab import NewToken, extend_embeddings, extend_tokenizer, read_tokens_file

# Not in the 32k vocabulary: each splits into its three UTF-8 byte pieces.
UNKNOWN = ["鑫", "犇", "曌"]
# Already single tokens.
KNOWN = ["中", "国", "。"]


def byte_pieces(tokenizer: PreTrainedTokenizerBase, char: str) -> tuple[int, ...]:
    return tuple(tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in char.encode()]))


def load_tokenizer(directory: Path, kind: str = "auto") -> PreTrainedTokenizerBase:
    """The fixture tokenizer, optionally with a prefix space added as LLaMA-2's tokenizers do."""
    if kind == "llama":
        # Metaspace with prepend_scheme="first": "▁" before the first character of a text.
        return LlamaTokenizer.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if kind == "legacy":
        # As in older LLaMA tokenizer.json files: "▁" before every segment.
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
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


@pytest.mark.parametrize("kind", ["auto", "llama"])
def test_pieces_are_the_byte_pieces_without_a_prefix_space(llama_tokenizer_dir, kind):
    tokenizer = load_tokenizer(llama_tokenizer_dir, kind)
    # The premise: encoded alone, LLaMA-2's tokenizer puts "▁" first.
    if kind == "llama":
        assert tokenizer.tokenize("鑫")[0] == "▁"
    original = [byte_pieces(tokenizer, char) for char in UNKNOWN]

    new_tokens = extend_tokenizer(tokenizer, UNKNOWN)

    assert [t.token for t in new_tokens] == UNKNOWN
    assert [t.pieces for t in new_tokens] == original
    assert [t.id for t in new_tokens] == [32000, 32001, 32002]
    assert len(tokenizer) == 32003


@pytest.mark.parametrize("kind", ["auto", "llama"])
def test_new_tokens_encode_as_one_id_and_decode_back(llama_tokenizer_dir, kind):
    tokenizer = load_tokenizer(llama_tokenizer_dir, kind)
    text = "我们鑫犇，中国曌。"
    before = len(tokenizer.encode(text, add_special_tokens=False))

    new_tokens = extend_tokenizer(tokenizer, UNKNOWN)

    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == before - 2 * len(UNKNOWN)
    assert {t.id for t in new_tokens} <= set(ids)
    assert tokenizer.decode(ids) == text
    assert not any(token in tokenizer.all_special_tokens for token in UNKNOWN)


def test_tokenizer_that_prefixes_every_segment_is_refused(llama_tokenizer_dir):
    tokenizer = load_tokenizer(llama_tokenizer_dir, "legacy")

    with pytest.raises(ValueError, match="would insert spaces"):
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


def test_save_and_reload_keep_tokens_and_rows(tokenizer, tmp_path):
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
