"""Assemble the data pipeline of a run: tokenizer, every source prepared, the mixture."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatflow.data.mixture import Mixture
from chatflow.data.sources import SourceError, first_line, local_path
from chatflow.data.store import PackedSource, prepare_source
from chatflow.sampler import MixtureSampler
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRunSpec, SpecError

if TYPE_CHECKING:
    from chatflow.vocab import NewToken


def resolve(path: str, base_dir: Path) -> str:
    """A model or tokenizer path: a local directory if it exists, else a hub id."""
    candidate = local_path(path, base_dir)
    return str(candidate) if candidate.exists() else path


def load_tokenizer(spec: ChatFlowRunSpec, base_dir: Path) -> tuple[Any, list[NewToken]]:
    """The run's tokenizer with `model.extendVocab` tokens added, and the tokens it added."""
    from transformers import AutoTokenizer

    name = spec.model.tokenizer or spec.model.base
    field = "spec.model.tokenizer" if spec.model.tokenizer else "spec.model.base"
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name, base_dir))
    except Exception as e:
        raise SpecError(f"{field}: cannot load tokenizer {name!r}: {first_line(e)}") from None
    if spec.model.extend_vocab is None:
        return tokenizer, []
    from chatflow.vocab import extend_tokenizer, read_tokens_file

    tokens_file = resolve(spec.model.extend_vocab.tokens_file, base_dir)
    return tokenizer, extend_tokenizer(tokenizer, read_tokens_file(tokens_file))


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
                    held_out=spec.training.eval.samples_per_source,
                )
            )
        except SourceError as e:
            raise SpecError(f"spec.data.sources[{i}].{e.field}: {e.message}") from None
        if packed[-1].num_blocks == 0:
            raise SpecError(
                f"spec.data.sources[{i}].path: {len(packed[-1].lengths)} packed samples are not "
                "enough to hold out training.eval.samplesPerSource and still train"
            )
    return packed


def build_mixture(spec: ChatFlowRunSpec, sources: list[PackedSource]) -> Mixture:
    sampler = MixtureSampler(Schedule.from_spec(spec), spec.training.seed)
    return Mixture(sampler, sources)
