"""The `chatflow` command, on the bundled tiny example and on broken manifests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chatflow.cli import main
from factories import tiny_manifest


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_at_json_prints_normalised_weights(capsys, tiny_example: Path) -> None:
    code, out, _ = run(
        capsys,
        "schedule",
        "-f",
        str(tiny_example),
        "--at",
        "0",
        "--at",
        "400",
        "--at",
        "10000",
        "--json",
    )
    assert code == 0
    points = json.loads(out)["points"]
    assert [p["at"] for p in points] == [0, 400, 10000]
    assert points[0]["weights"] == {
        "en-web": 0.5,
        "zh-web": 0.2,
        "zh-en": 0.3,
        "sft": 0.0,
        "chat": 0.0,
    }
    assert points[1]["weights"]["en-web"] == pytest.approx(0.3)
    assert points[2]["weights"]["sft"] == pytest.approx(0.25)
    for point in points:
        assert sum(point["weights"].values()) == pytest.approx(1.0)


def test_schedule_table_usage_and_png(
    capsys, tiny_example: Path, cache_dir: Path, tmp_path
) -> None:
    png = tmp_path / "new-dir" / "schedule.png"
    code, out, err = run(
        capsys,
        "schedule",
        "-f",
        str(tiny_example),
        "--cache-dir",
        str(cache_dir),
        "--png",
        str(png),
    )
    assert code == 0
    assert "growth" in out and "final" in out
    for source in ("en-web", "zh-web", "zh-en", "sft", "chat"):
        assert source in out
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert f"wrote {png}" in err


def test_schedule_warns_before_a_source_runs_out(
    capsys, tiny_example: Path, cache_dir: Path, tmp_path
) -> None:
    document = yaml.safe_load(tiny_example.read_text())
    sources = document["spec"]["data"]["sources"]
    for source in sources:
        source["maxEpochs"] = 0.01 if source["name"] == "zh-en" else None
    manifest = tiny_manifest(tiny_example, tmp_path / "run.yaml", data={"sources": sources})
    code, out, err = run(
        capsys, "schedule", "-f", str(manifest), "--cache-dir", str(cache_dir), "--json"
    )
    assert code == 0
    [warning] = [w for w in json.loads(out)["warnings"] if "zh-en" in w]
    assert "passes maxEpochs 0.01 at global sample" in warning
    assert f"warning: {warning}" in err


def test_sample_shows_sources_in_order_and_decodes(
    capsys, tiny_example: Path, cache_dir: Path
) -> None:
    code, out, _ = run(
        capsys, "sample", "-f", str(tiny_example), "--start", "100", "--count", "8", "--json"
    )
    assert code == 0
    samples = json.loads(out)["samples"]
    assert [s["index"] for s in samples] == list(range(100, 108))
    code, out, _ = run(
        capsys,
        "sample",
        "-f",
        str(tiny_example),
        "--cache-dir",
        str(cache_dir),
        "--start",
        "100",
        "--count",
        "8",
        "--json",
        "--decode",
    )
    decoded = json.loads(out)["samples"]
    assert [(s["source"], s["ordinal"]) for s in decoded] == [
        (s["source"], s["ordinal"]) for s in samples
    ]
    assert all(s["tokens"] > 0 and s["text"] for s in decoded)


def test_bad_manifest_is_one_line_and_exit_2(capsys, tmp_path, tiny_example: Path) -> None:
    document = yaml.safe_load(tiny_example.read_text())
    document["spec"]["schedule"]["end"]["wiki"] = 0.2
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(document))
    code, out, err = run(capsys, "schedule", "-f", str(manifest))
    assert (code, out) == (2, "")
    assert err.startswith("chatflow: error: spec.schedule.end.wiki: unknown source 'wiki'")
    assert err.count("\n") == 1


def test_entry_point_exit_status(tmp_path) -> None:
    missing = tmp_path / "missing.yaml"
    result = subprocess.run(
        [Path(sys.executable).parent / "chatflow", "sample", "-f", str(missing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"chatflow: error: {missing}: cannot read: No such file or directory"
    )


def test_missing_tokenizer_says_where_it_looked_then_what_the_hub_said(
    capsys, tmp_path, tiny_example: Path
) -> None:
    # The tiny example's manifest, copied where its relative asset paths lead nowhere.
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(tiny_example.read_text())
    code, out, err = run(capsys, "schedule", "-f", str(manifest), "--cache-dir", str(tmp_path))
    assert (code, out) == (2, "")
    looked = tmp_path / "tiny-assets" / "tokenizer"
    assert err.startswith(
        f"chatflow: error: spec.model.tokenizer: no tokenizer at {looked} (no such directory; "
        "`chatflow example tiny` builds it), and 'tiny-assets/tokenizer' could not be loaded "
        "from the Hugging Face hub: "
    )
    assert err.count("\n") == 1


def test_tokenizer_that_cannot_take_new_tokens_is_one_line(
    capsys, tmp_path, tiny_example: Path, cache_dir: Path
) -> None:
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    # A prefix space before every stretch of text, in a form vocabulary extension cannot undo,
    # saved as a plain tokenizer.json (no model class to rebuild its pipeline on loading).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tiny_example.parent / "tiny-assets" / "tokenizer" / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.backend_tokenizer.normalizer = normalizers.Prepend("▁▁")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    manifest = tiny_manifest(tiny_example, tmp_path / "run.yaml")
    document = yaml.safe_load(manifest.read_text())
    document["spec"]["model"]["tokenizer"] = str(tmp_path / "tokenizer")
    manifest.write_text(yaml.safe_dump(document, allow_unicode=True))

    code, out, err = run(capsys, "schedule", "-f", str(manifest), "--cache-dir", str(cache_dir))
    assert (code, out) == (2, "")
    assert err.startswith(
        f"chatflow: error: spec.model.tokenizer: cannot extend the vocabulary of "
        f"'{tmp_path / 'tokenizer'}': puts '▁' before the text after an added token"
    )
    assert err.count("\n") == 1


def test_seq_length_past_the_models_positions_is_refused_before_training(
    capsys, tmp_path, tiny_example: Path, cache_dir: Path
) -> None:
    manifest = tiny_manifest(tiny_example, tmp_path / "run.yaml", training={"seqLength": 2048})
    code, _, err = run(
        capsys,
        "train",
        "-f",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--cache-dir",
        str(cache_dir),
    )
    assert code == 2
    assert err.startswith(
        "chatflow: error: spec.training.seqLength: 2048 is more than the 1024 positions of the "
        "model"
    )
    assert err.count("\n") == 1
