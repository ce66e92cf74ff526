from __future__ import annotations

from pathlib import Path

import pytest

from chatflow.examples import save_llama_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LLaMA-style SentencePiece tokenizer (32,000 tokens) saved with save_pretrained."""
    return save_llama_tokenizer(tmp_path_factory.mktemp("tokenizer"))
