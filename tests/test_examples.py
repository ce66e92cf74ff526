"""The bundled examples: both manifests validate, and the tiny example's assets build offline."""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

import chatflow.examples
from chatflow.examples import build_tiny_example
from chatflow.spec import load_run

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "manifests" / "examples"


@pytest.fixture(scope="session")
def tiny_assets(tiny_example: Path) -> Path:
    """The tiny example's assets, next to its manifest (conftest's `tiny_example` builds them)."""
    return tiny_example.parent / "tiny-assets"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- manifests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny.yaml", "llama2-7b-zh.yaml"])
def test_manifest_validates(name: str) -> None:
    run = load_run(EXAMPLES / name)
    assert run.metadata.name == name.removesuffix(".yaml")


def test_manifests_share_one_chat_template() -> None:
    """So the prefix test below, run on the tiny example, covers the paper's setup too."""
    templates = {
        source.chat_template
        for name in ("tiny.yaml", "llama2-7b-zh.yaml")
        for source in load_run(EXAMPLES / name).spec.data.sources
        if source.kind == "instruction"
    }
    assert len(templates) == 1 and None not in templates


def test_tiny_manifest_names_the_built_assets(tiny_assets: Path) -> None:
    spec = load_run(EXAMPLES / "tiny.yaml").spec
    assert spec.model.extend_vocab is not None
    paths = [spec.model.base, spec.model.tokenizer, spec.model.extend_vocab.tokens_file]
    paths += [source.path for source in spec.data.sources]
    for path in paths:
        assert (tiny_assets.parent / str(path)).exists(), path


def test_tiny_chat_template_renders_prefixes_as_prefixes(tiny_assets: Path) -> None:
    """The trainer finds assistant tokens by rendering each conversation prefix."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    sources = load_run(EXAMPLES / "tiny.yaml").spec.data.sources
    template = next(source.chat_template for source in sources if source.kind == "instruction")

    chats = read_jsonl(tiny_assets / "data" / "chat.jsonl")
    messages = next(r["messages"] for r in chats if len(r["messages"]) == 4)

    def render(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], chat_template=template, tokenize=False, add_generation_prompt=prompt
        )

    full = render(len(messages), False)
    for i in (1, 3):  # the assistant turns
        assert full.startswith(render(i, True))
        assert render(i + 1, False).endswith(f" {messages[i]['content']}{tokenizer.eos_token}")
    assert full.startswith(f"{tokenizer.bos_token}[INST] {messages[0]['content']} [/INST]")


# --- building the tiny example -----------------------------------------------------------------


def test_tiny_example_files(tiny_assets: Path) -> None:
    data = tiny_assets / "data"
    sizes = {p.name: p.stat().st_size for p in data.iterdir()}
    assert set(sizes) == {"en.jsonl", "zh.jsonl", "zh-en.jsonl", "sft.jsonl", "chat.jsonl"}
    assert 900_000 < sizes["en.jsonl"] < 2_000_000
    assert 900_000 < sizes["zh.jsonl"] < 1_200_000
    assert sum(sizes.values()) < 10_000_000

    english = read_jsonl(data / "en.jsonl")
    assert all(set(r) == {"text"} and len(r["text"]) >= 200 for r in english)
    assert len({r["text"] for r in english}) == len(english)

    chinese = read_jsonl(data / "zh.jsonl")
    assert all(set(r) == {"text"} for r in chinese)
    assert len({r["text"] for r in chinese}) == len(chinese)
    assert all(any(unicodedata.name(c, "").startswith("CJK") for c in r["text"]) for r in chinese)

    pairs = read_jsonl(data / "zh-en.jsonl")
    assert len(pairs) >= 1000
    assert all(set(r) == {"zh", "en"} and r["zh"] and r["en"] for r in pairs)
    cross_references = ("variant of", "old variant of", "see ", "used in", "abbr. for", "CL:")
    assert not [r for r in pairs if r["en"].startswith(cross_references) or "[" in r["en"]]

    alpaca = read_jsonl(data / "sft.jsonl")
    assert len(alpaca) >= 1000
    assert all(set(r) == {"instruction", "input", "output"} for r in alpaca)

    chats = read_jsonl(data / "chat.jsonl")
    assert len(chats) >= 1000
    turns = Counter(len(r["messages"]) for r in chats)
    assert set(turns) == {2, 4}
    for record in chats:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(set(m) == {"role", "content"} and m["content"] for m in record["messages"])

    licenses = (tiny_assets / "LICENSES.md").read_text(encoding="utf-8")
    for license_ in ("PSF", "MIT", "CC BY-SA 4.0", "Apache-2.0"):
        assert license_ in licenses


def test_every_asset_is_readable_by_every_user(tiny_assets: Path) -> None:
    """The trainer image builds the assets as root and trains as uid 65532."""
    files = [path for path in tiny_assets.rglob("*") if path.is_file()]
    assert files and all(path.stat().st_mode & 0o444 == 0o444 for path in files)


def test_new_tokens_are_split_into_byte_pieces(tiny_assets: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    tokens = (tiny_assets / "new-tokens.txt").read_text(encoding="utf-8").splitlines()
    assert 1000 <= len(tokens) <= 2000
    assert len(set(tokens)) == len(tokens)
    vocab = tokenizer.get_vocab()
    for token in tokens:
        assert len(token) == 1 and token not in vocab
        pieces = [p for p in tokenizer.tokenize(token) if p != "▁"]
        assert len(pieces) >= 2 and all(p.startswith("<0x") for p in pieces), (token, pieces)

    # Most frequent first, counted over the Chinese data.
    text = "".join(r["text"] for r in read_jsonl(tiny_assets / "data" / "zh.jsonl"))
    counts = Counter(text)
    frequencies = [counts[t] for t in tokens]
    assert frequencies == sorted(frequencies, reverse=True)


def test_model_loads_with_the_tokenizers_vocabulary(tiny_assets: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert model.get_output_embeddings().weight.data_ptr() != (
        model.get_input_embeddings().weight.data_ptr()
    )
    assert (model.config.bos_token_id, model.config.eos_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_build_is_idempotent(tiny_assets: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_assets.rglob("*")}
    assert build_tiny_example(tiny_assets) == tiny_assets
    assert {p: p.stat().st_mtime_ns for p in tiny_assets.rglob("*")} == before


def test_build_is_deterministic(tiny_assets: Path, tmp_path: Path) -> None:
    again = build_tiny_example(tmp_path / "tiny-assets")
    assert files_of(again) == files_of(tiny_assets)


# --- atomic installation (with a stand-in for the slow part) -----------------------------------


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(root: Path) -> None:
        (root / "asset").write_text("new", encoding="utf-8")

    monkeypatch.setattr(chatflow.examples, "_build", build)


@pytest.mark.usefixtures("fake_build")
def test_older_build_is_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "tiny-assets"
    dest.mkdir()
    (dest / ".complete").write_text("made-by-older-code\n", encoding="utf-8")
    (dest / "stale").write_text("old", encoding="utf-8")

    build_tiny_example(dest)

    assert sorted(p.name for p in dest.iterdir()) == [".complete", "asset"]
    assert os.listdir(tmp_path) == ["tiny-assets"]  # no temporary directories left behind


@pytest.mark.usefixtures("fake_build")
def test_empty_directory_is_filled(tmp_path: Path) -> None:
    dest = tmp_path / "tiny-assets"
    dest.mkdir()
    build_tiny_example(dest)
    assert (dest / "asset").read_text(encoding="utf-8") == "new"


@pytest.mark.usefixtures("fake_build")
def test_other_directory_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not a tiny example build"):
        build_tiny_example(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build(root: Path) -> None:
        (root / "half").write_text("", encoding="utf-8")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(chatflow.examples, "_build", build)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_tiny_example(tmp_path / "tiny-assets")
    assert os.listdir(tmp_path) == []
