"""A randomly initialised LLaMA of given sizes, saved once with `save_pretrained` in bf16 (as
LLaMA-2's checkpoints are stored) and reused: the model of the benchmarks that need one larger
than the tiny example's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def saved_llama(work: Path, **sizes: int) -> Path:
    """The directory of the model with these `LlamaConfig` sizes under `work`, made if missing."""
    sizes = {"vocab_size": 32000, "max_position_embeddings": 4096, **sizes}
    key = hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:12]
    directory = work / f"llama-{key}"
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    work.mkdir(parents=True, exist_ok=True)
    staging = work / f".llama-{key}.tmp"
    model = LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False))
    model.to(torch.bfloat16).save_pretrained(staging)
    staging.rename(directory)
    return directory
