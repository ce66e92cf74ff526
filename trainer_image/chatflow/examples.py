"""The bundled tiny example, built offline from files inside packages the project depends on."""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path


def save_llama_tokenizer(dest: Path) -> Path:
    """Save a LLaMA-style 32k SentencePiece tokenizer (mistral-common's v1) in Hugging Face format."""
    from transformers import AutoTokenizer

    model = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(str(model), Path(tmp) / "tokenizer.model")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.save_pretrained(dest)
    return dest
