from __future__ import annotations

from pathlib import Path

import pytest

from chatflow.examples import build_tiny_example, save_llama_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "manifests" / "examples" / "tiny.yaml"


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LLaMA-style SentencePiece tokenizer (32,000 tokens) saved with save_pretrained."""
    return save_llama_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_example() -> Path:
    """The bundled tiny example's manifest, its assets built where `make run` builds them.

    The build is idempotent and atomic, so test sessions and `make run` share it.
    """
    build_tiny_example(TINY.parent / "tiny-assets")
    return TINY


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One packed-data cache for the session: sources are tokenized once."""
    return tmp_path_factory.mktemp("cache")
