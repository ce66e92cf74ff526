"""The data pipeline on small files made here, with the real LLaMA-style tokenizer."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from chatflow.data.mixture import Mixture
from chatflow.data.packing import Packer
from chatflow.data.pipeline import build_mixture, prepare_sources
from chatflow.data.render import Renderer
from chatflow.data.sources import SourceError, input_shards
from chatflow.data.store import (
    IGNORE_INDEX,
    PackedSource,
    SourceExhausted,
    entry_directory,
    write_listing,
    write_shard,
)
from chatflow.sampler import Position
from chatflow.spec import SourceSpec, SpecError, parse_run
from factories import run_document

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }}"
    " [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)


def source(**fields) -> SourceSpec:
    defaults = {"name": "s", "kind": "pretrain", "language": "en", "path": "data.jsonl"}
    return SourceSpec.model_validate(defaults | fields)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# --- packing -----------------------------------------------------------------------------------


def test_pretraining_stream_is_cut_into_full_blocks_across_documents() -> None:
    packer = Packer(seq_length=4, pad_id=0, split_documents=True)
    documents = [([1, 2, 3, 4, 5], [0, 1, 1, 1, 1]), ([1, 6, 7], [0, 1, 1])]
    ids, mask, lengths = packer.add(documents)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 4], [5, 1, 6, 7]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [1, 0, 1, 1]])  # boundary masked
    np.testing.assert_array_equal(lengths, [4, 4])
    packer.add([([1, 8], [0, 1])])
    ids, mask, lengths = packer.finish()
    np.testing.assert_array_equal(ids, [[1, 8, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 0, 0]])  # padding is never a target
    np.testing.assert_array_equal(lengths, [2])


def test_instruction_documents_are_never_split() -> None:
    packer = Packer(seq_length=5, pad_id=9, split_documents=False)
    documents = [([1, 2, 3], [0, 0, 1]), ([4, 5, 6], [0, 0, 1]), ([7] * 8, [1] * 8)]
    ids, _, lengths = packer.add(documents)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 9, 9], [4, 5, 6, 9, 9]])
    np.testing.assert_array_equal(lengths, [3, 3])
    ids, _, lengths = packer.finish()
    np.testing.assert_array_equal(ids, [[7] * 5])  # longer than a block: truncated
    assert packer.truncated == 1


# --- rendering ---------------------------------------------------------------------------------


def trained_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The trained-on tokens' text, a leading space included (decode would strip it)."""
    pieces = tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, mask, strict=True) if m])
    return "".join(pieces).replace("▁", " ")


def test_pretraining_document_is_bos_text_eos_with_bos_masked(tokenizer) -> None:
    [(ids, mask)] = Renderer(source(), tokenizer)({"text": ["你好, world", "", "   "]})
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]) == "你好, world"
    assert mask == [0] + [1] * (len(ids) - 1)


def test_parallel_pairs_render_both_directions_with_the_template(tokenizer) -> None:
    spec = source(
        kind="parallel",
        language=None,
        languages=["zh", "en"],
        fields={"source": "zh", "target": "en"},
        template="<{source_language}> {source} <{target_language}> {target}",
    )
    documents = Renderer(spec, tokenizer)({"zh": ["猫", ""], "en": ["cat", "dog"]})
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in documents]
    assert texts == ["<zh> 猫 <en> cat", "<en> cat <zh> 猫"]  # the empty pair is skipped
    forward_only = spec.model_copy(update={"directions": "forward"})
    assert len(Renderer(forward_only, tokenizer)({"zh": ["猫"], "en": ["cat"]})) == 1


def test_dotted_fields_reach_into_nested_translation_columns(tokenizer) -> None:
    spec = source(
        kind="parallel",
        language=None,
        languages=["zh", "en"],
        fields={"source": "translation.zh", "target": "translation.en"},
        directions="forward",
    )
    [(ids, _)] = Renderer(spec, tokenizer)({"translation": [{"zh": "猫", "en": "cat"}]})
    assert tokenizer.decode(ids, skip_special_tokens=True) == "猫\ncat"


def test_alpaca_instruction_trains_on_the_response_only(tokenizer) -> None:
    spec = source(kind="instruction", language=None, format="alpaca", chat_template=CHAT_TEMPLATE)
    batch = {"instruction": ["翻译成英文"], "input": ["猫"], "output": ["cat"]}
    [(ids, mask)] = Renderer(spec, tokenizer)(batch)
    assert tokenizer.decode(ids).startswith("<s>[INST] 翻译成英文\n\n猫 [/INST]")
    assert trained_text(tokenizer, ids, mask) == " cat</s>"


def test_chat_messages_train_on_every_assistant_turn(tokenizer) -> None:
    spec = source(kind="instruction", language=None, format="messages", chat_template=CHAT_TEMPLATE)
    messages = [
        {"role": "user", "content": "一"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "二"},
        {"role": "assistant", "content": "two"},
    ]
    [(ids, mask)] = Renderer(spec, tokenizer)({"messages": [messages]})
    assert trained_text(tokenizer, ids, mask) == " one</s> two</s>"


def test_instruction_errors_name_the_field(tokenizer) -> None:
    spec = source(kind="instruction", language=None, format="alpaca")
    with pytest.raises(SourceError, match=r"^chatTemplate: the tokenizer has no chat template"):
        Renderer(spec, tokenizer)
    suffixed = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    spec = spec.model_copy(update={"chat_template": suffixed})
    with pytest.raises(SourceError, match=r"^chatTemplate: a conversation prefix"):
        Renderer(spec, tokenizer)({"instruction": ["a"], "output": ["b"]})
    with pytest.raises(SourceError, match=r"^format: no column 'output'"):
        Renderer(spec, tokenizer)({"instruction": ["a"]})


# --- the cache ---------------------------------------------------------------------------------


def prepare_source(source, base, cache, tokenizer, seq_length, seed=0, held_out=0) -> PackedSource:
    """All of one source prepared in this process (data/prepare.py decides how much in a run)."""
    entry = entry_directory(source, base, cache, tokenizer, seq_length)
    shards = input_shards(source, base)
    write_listing(entry, shards)
    for index, shard in enumerate(shards):
        write_shard(entry, index, shard, source, base, tokenizer, seq_length)
    return PackedSource.open(source, entry, seq_length, seed, held_out)


def block_arrays(packed: PackedSource) -> tuple[np.ndarray, np.ndarray]:
    """Every prepared block's input ids and loss mask, (blocks, seqLength) each."""
    examples = [packed.example(b) for b in range(packed.blocks)]
    return np.stack([e[0] for e in examples]), np.stack([e[1] != IGNORE_INDEX for e in examples])


def test_prepare_packs_once_and_reuses_the_cache(tmp_path, tokenizer) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"text": f"document {i} " * 20} for i in range(50)])
    packed = prepare_source(source(), tmp_path, tmp_path / "cache", tokenizer, 32)
    assert packed.documents == 50 and packed.num_blocks > 10 and packed.complete
    assert block_arrays(packed)[0].shape == (packed.num_blocks, 32)
    meta = packed.directory / "shard-000000" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = prepare_source(source(), tmp_path, tmp_path / "cache", tokenizer, 32)
    assert again.directory == packed.directory
    assert meta.stat().st_mtime_ns == stamp
    other = prepare_source(source(), tmp_path, tmp_path / "cache", tokenizer, 64)
    assert other.directory != packed.directory  # seqLength is part of the fingerprint


def test_a_half_written_shard_is_never_used(tmp_path, tokenizer) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"text": "hello world " * 30}] * 5)
    packed = prepare_source(source(), tmp_path, tmp_path / "cache", tokenizer, 16)
    expected = block_arrays(packed)[0]
    shard = packed.directory / "shard-000000"
    # A writer killed mid-shard leaves only its temporary directory; readers see no shard.
    shard.rename(packed.directory / ".shard-000000.tmp-host-99999-dead")
    (packed.directory / ".shard-000000.tmp-host-99999-dead" / "input_ids.bin").write_bytes(b"\0")
    reopened = PackedSource.open(source(), packed.directory, 16, seed=0)
    assert (reopened.blocks, reopened.complete) == (0, False)
    rebuilt = prepare_source(source(), tmp_path, tmp_path / "cache", tokenizer, 16)
    np.testing.assert_array_equal(block_arrays(rebuilt)[0], expected)


def test_every_epoch_visits_each_block_once_in_a_new_order(tmp_path, tokenizer) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"text": f"line {i} " * 10} for i in range(40)])
    packed = prepare_source(source(max_epochs=2), tmp_path, tmp_path / "c", tokenizer, 16, seed=3)
    blocks = packed.num_blocks
    first = [packed.block_of(k) for k in range(blocks)]
    second = [packed.block_of(k) for k in range(blocks, 2 * blocks)]
    assert sorted(first) == sorted(second) == list(range(blocks))
    assert first != second
    with pytest.raises(SourceExhausted, match=r"source 's' exhausted: .* maxEpochs 2"):
        packed.block_of(2 * blocks)


# --- the whole pipeline ------------------------------------------------------------------------


def tiny_run(tmp_path: Path, **schedule) -> tuple:
    write_jsonl(tmp_path / "data/en.jsonl", [{"text": f"english text {i} " * 8} for i in range(60)])
    write_jsonl(tmp_path / "data/zh.jsonl", [{"text": f"中文文本{i}。" * 8} for i in range(60)])
    write_jsonl(tmp_path / "data/zh-en.jsonl", [{"zh": "猫", "en": "cat"}] * 60)
    write_jsonl(tmp_path / "data/sft.jsonl", [{"instruction": "翻译", "output": "ok"}] * 60)
    document = run_document(**({"schedule": schedule} if schedule else {}))
    document["spec"]["data"]["sources"][3]["chatTemplate"] = CHAT_TEMPLATE
    return parse_run(document).spec, tmp_path


def test_mixture_yields_labelled_samples_following_the_sampler(tmp_path, tokenizer) -> None:
    spec, base = tiny_run(tmp_path)
    mixture = build_mixture(spec, prepare_sources(spec, base, tmp_path / "cache", tokenizer))
    counts, tokens = np.zeros(4, dtype=int), np.zeros(4, dtype=int)
    for sample in islice(mixture.samples(Position.start(4)), 400):
        counts[sample.source] += 1
        tokens[sample.source] += sample.tokens
        assert sample.input_ids.shape == sample.labels.shape == (64,)
        trained = sample.labels != IGNORE_INDEX
        np.testing.assert_array_equal(sample.labels[trained], sample.input_ids[trained])
    expected = np.bincount(mixture.sampler.sources_of(0, 400), minlength=4)
    np.testing.assert_array_equal(counts, expected)
    assert (tokens <= counts * 64).all()
    assert tokens[0] > 0.9 * counts[0] * 64  # pretraining blocks are full but one


def test_consumers_of_the_mixture_split_it_exactly(tmp_path, tokenizer) -> None:
    spec, base = tiny_run(tmp_path)
    mixture: Mixture = build_mixture(spec, prepare_sources(spec, base, tmp_path / "c", tokenizer))
    whole = [(s.index, s.block) for s in islice(mixture.samples(Position.start(4)), 90)]
    shares = [
        (s.index, s.block)
        for c in range(3)
        for s in islice(mixture.samples(Position.start(4), c, 3), 30)
    ]
    assert sorted(shares) == whole


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("missing/en.jsonl", r"^spec\.data\.sources\[0\]\.path: no such file or directory"),
        ("no-such-org/no-such-dataset", r"^spec\.data\.sources\[0\]\.path: cannot load .* hub"),
        ("mixed", r"^spec\.data\.sources\[0\]\.path: mixed or unknown file types"),
        ("data/sft.jsonl", r"^spec\.data\.sources\[0\]\.textField: no column 'text'"),
        (
            "broken.jsonl",
            r"^spec\.data\.sources\[0\]\.path: .*broken.jsonl: the record at byte 14 ",
        ),
    ],
)
def test_unloadable_sources_fail_with_one_line(tmp_path, tokenizer, monkeypatch, path, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec, base = tiny_run(tmp_path)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "mixed" / "b.txt").write_text("b\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    document = run_document()
    document["spec"]["data"]["sources"][0]["path"] = path
    spec = parse_run(document).spec
    with pytest.raises(SpecError, match=expected) as error:
        prepare_sources(spec, base, tmp_path / "cache", tokenizer)
    assert "\n" not in str(error.value)


def test_a_missing_text_column_names_text_field(tmp_path, tokenizer) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"body": "x"}])
    with pytest.raises(SourceError, match=r"^textField: no column 'text' in the data"):
        prepare_source(source(), tmp_path, tmp_path / "cache", tokenizer, 16)
    assert not list((tmp_path / "cache").glob("s-*/*shard-*"))  # nothing half-written left


def test_text_and_parquet_files_load_too(tmp_path, tokenizer) -> None:
    import datasets

    (tmp_path / "a.txt").write_text("line one\nline two\n")
    datasets.Dataset.from_dict({"text": ["parquet row"] * 3}).to_parquet(tmp_path / "b.parquet")
    text = prepare_source(source(path="a.txt"), tmp_path, tmp_path / "c", tokenizer, 8)
    parquet = prepare_source(source(path="*.parquet"), tmp_path, tmp_path / "c", tokenizer, 8)
    assert (text.documents, parquet.documents) == (2, 3)


def test_packed_source_reopens_from_its_directory(tmp_path, tokenizer) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"text": "abc " * 40}])
    packed = prepare_source(source(), tmp_path, tmp_path / "cache", tokenizer, 16)
    reopened = PackedSource.open(source(), packed.directory, 16, seed=0)
    assert reopened.tokens == packed.tokens == int(packed.lengths.sum())


def test_the_bundled_example_with_its_extended_vocabulary(tiny_example: Path, cache_dir: Path):
    from chatflow.data.pipeline import load_tokenizer
    from chatflow.spec import load_run
    from chatflow.vocab import read_tokens_file

    run = load_run(tiny_example)
    base = tiny_example.parent
    tokenizer, new_tokens = load_tokenizer(run.spec, base)
    added = read_tokens_file(base / run.spec.model.extend_vocab.tokens_file)
    assert len(tokenizer) == 32000 + len(added) == 32000 + len(new_tokens)
    packed = {p.name: p for p in prepare_sources(run.spec, base, cache_dir, tokenizer)}
    # Chinese text now uses the added characters as single tokens.
    assert (block_arrays(packed["zh-web"])[0] >= 32000).mean() > 0.03
    assert (block_arrays(packed["en-web"])[0] >= 32000).mean() < 0.001
    for name in ("sft", "chat"):
        source = packed[name]
        ids, masks = block_arrays(source)
        trained, real = int(masks.sum()), source.tokens
        assert 0 < trained < real / 2  # prompts are masked, responses trained
        real_tokens = source.lengths[0]  # the rest of the block is padding (EOS ids, mask 0)
        ids, mask = ids[0, :real_tokens], masks[0, :real_tokens]
        assert tokenizer.decode(ids[mask]).count("</s>") == tokenizer.decode(ids).count("</s>")
    assert packed["zh-en"].documents == 2 * 5000  # both directions of every pair
