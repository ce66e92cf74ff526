"""Assemble the data pipeline of a run: tokenizer, every source prepared, the mixture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatflow.data.mixture import Mixture
from chatflow.data.sources import SourceError, first_line, local_path
from chatflow.data.store import PackedSource, prepare_source
from chatflow.sampler import MixtureSampler
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRunSpec, SpecError


def resolve(path: str, base_dir: Path) -> str:
    """A model or tokenizer path: a local directory if it exists, else a hub id."""
    candidate = local_path(path, base_dir)
    return str(candidate) if candidate.exists() else path


def load_tokenizer(spec: ChatFlowRunSpec, base_dir: Path) -> Any:
    """The run's tokenizer, with `model.extendVocab` tokens added."""
    from transformers import AutoTokenizer

    name = spec.model.tokenizer or spec.model.base
    field = "spec.model.tokenizer" if spec.model.tokenizer else "spec.model.base"
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name, base_dir))
    except Exception as e:
        raise SpecError(f"{field}: cannot load tokenizer {name!r}: {first_line(e)}") from None
    if spec.model.extend_vocab is not None:
        from chatflow.vocab import extend_tokenizer, read_tokens_file

        tokens_file = resolve(spec.model.extend_vocab.tokens_file, base_dir)
        extend_tokenizer(tokenizer, read_tokens_file(tokens_file))
    return tokenizer


def prepare_sources(
    spec: ChatFlowRunSpec, base_dir: Path, cache_dir: Path, tokenizer: Any
) -> list[PackedSource]:
    """Tokenize and pack every source (cached); errors name the source's field."""
    packed = []
    for i, source in enumerate(spec.data.sources):
        try:
            packed.append(
                prepare_source(
                    source,
                    base_dir,
                    cache_dir,
                    tokenizer,
                    spec.training.seq_length,
                    spec.training.seed,
                )
            )
        except SourceError as e:
            raise SpecError(f"spec.data.sources[{i}].{e.field}: {e.message}") from None
    return packed


def build_mixture(spec: ChatFlowRunSpec, sources: list[PackedSource]) -> Mixture:
    sampler = MixtureSampler(Schedule.from_spec(spec), spec.training.seed)
    return Mixture(sampler, sources)
