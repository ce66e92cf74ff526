"""Assemble the data pipeline of a run: tokenizer, every source prepared, the mixture."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from chatflow.data.mixture import Mixture
from chatflow.data.prepare import open_prepared, prepare
from chatflow.data.sources import HUB_ID, first_line, local_path
from chatflow.data.store import PackedSource
from chatflow.sampler import MixtureSampler, Position
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRunSpec, SpecError

if TYPE_CHECKING:
    from chatflow.data.progress import Progress
    from chatflow.vocab import NewToken

T = TypeVar("T")


@contextmanager
def _hub_quiet() -> Iterator[None]:
    """huggingface_hub's own warnings off: on a network error it logs one per retry before it
    raises, and the error is reported as one line by the caller."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def from_pretrained(
    load: Callable[[str], T], name: str, base_dir: Path, field: str, what: str
) -> T:
    """`load(path)` of a local directory, else of a hub id; a failure is one line naming `field`.

    A relative path is looked for beside the manifest first. When it is not there, the message
    says where it was looked for before what the hub answered, since a mistyped or unbuilt local
    path is the usual cause (the hub's own error would be only a DNS failure on an offline node).
    """
    local = local_path(name, base_dir)
    try:
        with _hub_quiet():
            return load(str(local) if local.exists() else name)
    except Exception as e:
        if local.exists():
            problem = f"cannot load {what} from {local}: {first_line(e)}"
        else:
            hint = "; `chatflow example tiny` builds it" if "tiny-assets" in local.parts else ""
            problem = f"no {what} at {local} (no such directory{hint})"
            if HUB_ID.match(name):
                problem += f", and {name!r} could not be loaded from the Hugging Face hub: "
                problem += first_line(e)
        raise SpecError(f"{field}: {problem}") from None


def load_tokenizer(spec: ChatFlowRunSpec, base_dir: Path) -> tuple[Any, list[NewToken]]:
    """The run's tokenizer with `model.extendVocab` tokens added, and the tokens it added."""
    from transformers import AutoTokenizer

    name = spec.model.tokenizer or spec.model.base
    field = "spec.model.tokenizer" if spec.model.tokenizer else "spec.model.base"
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, base_dir, field, "tokenizer")
    if spec.model.extend_vocab is None:
        return tokenizer, []
    from chatflow.vocab import TokenizerError, extend_tokenizer, read_tokens_file

    tokens_field = "spec.model.extendVocab.tokensFile"
    try:
        tokens = read_tokens_file(local_path(spec.model.extend_vocab.tokens_file, base_dir))
    except SpecError as e:
        raise SpecError(f"{tokens_field}: {e}") from None
    try:
        return tokenizer, extend_tokenizer(tokenizer, tokens)
    except TokenizerError as e:
        raise SpecError(f"{field}: cannot extend the vocabulary of {name!r}: {e}") from None


def load_model_config(spec: ChatFlowRunSpec, base_dir: Path) -> Any:
    """The base model's config, checked against the run: `training.seqLength` must fit it."""
    from transformers import AutoConfig

    base = spec.model.base
    config = from_pretrained(AutoConfig.from_pretrained, base, base_dir, "spec.model.base", "model")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and spec.training.seq_length > positions:
        raise SpecError(
            f"spec.training.seqLength: {spec.training.seq_length} is more than the "
            f"{positions} positions of the model {base!r} (max_position_embeddings)"
        )
    return config


def prepare_sources(
    spec: ChatFlowRunSpec,
    base_dir: Path,
    cache_dir: Path,
    tokenizer: Any,
    *,
    position: Position | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    prepared: bool = False,
) -> list[PackedSource]:
    """Every source, prepared as far as the run needs from `position` (see data/prepare.py).

    `prepared`: a preparation step ran before (on Kubernetes, the operator's Job); only open it.
    Errors name the source's field.
    """
    if prepared:
        return open_prepared(spec, base_dir, cache_dir, tokenizer, position)
    workers = workers or spec.data.preparation.workers
    return prepare(
        spec, base_dir, cache_dir, tokenizer, workers=workers, position=position, progress=progress
    )


def build_mixture(spec: ChatFlowRunSpec, sources: list[PackedSource]) -> Mixture:
    sampler = MixtureSampler(Schedule.from_spec(spec), spec.training.seed)
    return Mixture(sampler, sources)
