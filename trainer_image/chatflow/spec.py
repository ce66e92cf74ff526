"""The ChatFlowRun spec: the one definition of what a user writes.

Everything else derives from these models: the trainer reads them, the operator's CRD schema is
generated from them, and the docs describe them. This module imports neither torch nor kopf so the
operator image can use it.

Field names are camelCase in YAML (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "chatflow.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "ChatFlowRun"

# A DNS label: source names become Kubernetes-safe keys and Prometheus label values.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LANGUAGE_PATTERN = r"^[a-z]{2,3}(-[A-Za-z0-9]+)*$"

PARALLEL_PLACEHOLDERS = ("source", "target", "source_language", "target_language")


class FieldError(ValueError):
    """A validation error about a field below the model that raises it.

    Pydantic reports errors raised in a model validator at the model's own location; carrying the
    relative path lets `format_errors` name the exact field.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


Language = Annotated[str, Field(pattern=LANGUAGE_PATTERN, description="ISO 639 code, e.g. en, zh")]
Weight = Annotated[float, Field(ge=0, description="relative weight, normalised to sum 1")]
Weights = dict[str, Weight]


# --- model -------------------------------------------------------------------------------------


class ExtendVocab(_Spec):
    """Add tokens (ChatFlow: 8,076 Chinese characters) before training."""

    tokens_file: str = Field(
        min_length=1,
        description="UTF-8 file, one new token per line; each new embedding row starts as the "
        "mean of the rows of the old tokens it used to split into",
    )


class ModelSpec(_Spec):
    base: str = Field(min_length=1, description="Hugging Face model id or local directory")
    tokenizer: str | None = Field(None, description="tokenizer id or directory; defaults to `base`")
    extend_vocab: ExtendVocab | None = None


# --- data --------------------------------------------------------------------------------------


class ParallelFields(_Spec):
    source: str = Field(
        min_length=1,
        description="column with the source-language text; dotted names such as "
        "`translation.zh` reach into nested columns",
    )
    target: str = Field(min_length=1, description="column with the target-language text")


class SourceSpec(_Spec):
    """One corpus. `kind` decides how its records become training tokens."""

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    kind: Literal["pretrain", "parallel", "instruction"]
    path: str = Field(
        min_length=1,
        description="Hugging Face hub dataset id, or a local file, directory or glob "
        "(.json, .jsonl, .parquet, .txt, .arrow); relative paths are relative to the manifest",
    )
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = "train"
    streaming: bool = Field(False, description="read the corpus as a stream (large corpora)")
    language: Language | None = Field(None, description="pretrain and instruction sources")
    languages: tuple[Language, Language] | None = Field(
        None, description="parallel sources: [source language, target language]"
    )
    text_field: str = Field("text", description="pretrain: the column holding the text")
    fields: ParallelFields | None = Field(None, description="parallel: the two text columns")
    directions: Literal["both", "forward"] = Field(
        "both", description="parallel: render source->target and target->source, or only the first"
    )
    template: str = Field(
        "{source}\n{target}",
        description="parallel: how one direction of a pair is rendered; placeholders "
        + ", ".join(f"{{{p}}}" for p in PARALLEL_PLACEHOLDERS),
    )
    format: Literal["alpaca", "messages"] | None = Field(
        None,
        description="instruction: alpaca (instruction/input/output) or chat `messages` "
        "(list of {role, content})",
    )
    chat_template: str | None = Field(
        None, description="instruction: Jinja chat template; defaults to the tokenizer's"
    )
    max_epochs: float | None = Field(
        None,
        gt=0,
        description="how many passes over this source the run may make; past it the run stops "
        "with an error. Unset: repeat without limit",
    )

    @model_validator(mode="after")
    def _fields_of_kind(self) -> SourceSpec:
        wants = {
            "pretrain": {"language"},
            "instruction": {"format"},
            "parallel": {"languages", "fields"},
        }[self.kind]
        only = {"language": "pretrain/instruction", "languages": "parallel", "fields": "parallel"}
        only["format"] = only["chat_template"] = "instruction"
        for name in wants:
            if getattr(self, name) is None:
                raise FieldError(to_camel(name), f"required for kind {self.kind}")
        for name, kinds in only.items():
            if getattr(self, name) is not None and self.kind not in kinds.split("/"):
                raise FieldError(to_camel(name), f"only allowed for kind {kinds}")
        if self.kind == "parallel":
            names = set(re.findall(r"{(\w*)}", self.template))
            unknown = names - set(PARALLEL_PLACEHOLDERS)
            if unknown:
                raise FieldError("template", f"unknown placeholder {{{sorted(unknown)[0]}}}")
            if not {"source", "target"} <= names:
                raise FieldError("template", "must contain {source} and {target}")
        return self

    @property
    def language_label(self) -> str:
        """The `language` label of this source's metrics: `zh`, or `zh-en` for parallel."""
        return "-".join(self.languages) if self.languages else str(self.language)


class DataSpec(_Spec):
    sources: list[SourceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> DataSpec:
        seen: set[str] = set()
        for i, source in enumerate(self.sources):
            if source.name in seen:
                raise FieldError(f"sources[{i}].name", f"duplicate source name {source.name!r}")
            seen.add(source.name)
        return self


# --- schedule ----------------------------------------------------------------------------------


class Stage(_Spec):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="defaults to stage-<index>")
    until: int | None = Field(
        None, gt=0, description="progress at which the stage ends; unset on the last stage"
    )
    weights: Weights


class Point(_Spec):
    at: int = Field(ge=0, description="progress at which the mixture equals `weights`")
    weights: Weights


class ScheduleSpec(_Spec):
    """Target mixture as a function of progress (samples or tokens consumed)."""

    curve: Literal["linear", "cosine", "stages", "points"] = Field(
        "linear",
        description="linear/cosine: from `start` to `end` over `growth`; stages: piecewise "
        "constant; points: piecewise linear through `points`",
    )
    unit: Literal["samples", "tokens"] = Field(
        "samples",
        description="what progress counts: training samples, or tokens (samples x seqLength)",
    )
    growth: int | None = Field(
        None, gt=0, description="T_grow: progress at which linear/cosine reach `end`"
    )
    start: Weights | None = None
    end: Weights | None = None
    stages: list[Stage] | None = Field(None, min_length=1)
    points: list[Point] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _shape_of_curve(self) -> ScheduleSpec:
        needs = {
            "linear": ("growth", "start", "end"),
            "cosine": ("growth", "start", "end"),
            "stages": ("stages",),
            "points": ("points",),
        }
        for name in needs[self.curve]:
            if getattr(self, name) is None:
                raise FieldError(name, f"required for curve {self.curve}")
        for name in {n for names in needs.values() for n in names} - set(needs[self.curve]):
            if getattr(self, name) is not None:
                raise FieldError(name, f"not used by curve {self.curve}")
        for path, weights in self.weight_sets():
            if weights and not any(weights.values()):
                raise FieldError(path, "weights are all zero")
            if not weights:
                raise FieldError(path, "no weights given")
        if self.stages:
            ends = [s.until for s in self.stages]
            if any(u is None for u in ends[:-1]):
                i = ends.index(None)
                raise FieldError(f"stages[{i}].until", "required on every stage but the last")
            for i in range(1, len(ends) - (ends[-1] is None)):
                if ends[i] <= ends[i - 1]:  # type: ignore[operator]
                    raise FieldError(f"stages[{i}].until", "must be greater than the previous")
        if self.points:
            for i in range(1, len(self.points)):
                if self.points[i].at <= self.points[i - 1].at:
                    raise FieldError(f"points[{i}].at", "must be greater than the previous")
        return self

    def weight_sets(self) -> list[tuple[str, Weights]]:
        """Every weights mapping in the schedule, with its field path."""
        sets: list[tuple[str, Weights]] = []
        if self.start is not None:
            sets.append(("start", self.start))
        if self.end is not None:
            sets.append(("end", self.end))
        sets += [(f"stages[{i}].weights", s.weights) for i, s in enumerate(self.stages or [])]
        sets += [(f"points[{i}].weights", p.weights) for i, p in enumerate(self.points or [])]
        return sets


# --- training ----------------------------------------------------------------------------------


class OptimizerSpec(_Spec):
    """AdamW with linear warmup, then cosine decay to `minLr` at the end of the run."""

    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-5, ge=0, description="learning rate at the end of the run")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0: off")


class CheckpointSpec(_Spec):
    every_steps: int = Field(500, gt=0, description="save every N optimizer steps (and on SIGTERM)")
    keep: int = Field(3, gt=0, description="how many of the newest checkpoints to keep")


class EvalSpec(_Spec):
    every_steps: int = Field(200, gt=0, description="evaluate held-out loss every N steps")
    samples_per_source: int = Field(
        8, ge=0, description="packed samples of each source held out of training for evaluation"
    )


class TrainingSpec(_Spec):
    seq_length: int = Field(2048, ge=8, description="tokens per training sample")
    global_batch_size: int = Field(512, gt=0, description="samples per optimizer step")
    micro_batch_size: int = Field(
        1, gt=0, description="samples per process per forward pass; accumulation fills the rest"
    )
    max_samples: int | None = Field(None, gt=0, description="stop after this many samples")
    max_tokens: int | None = Field(None, gt=0, description="stop after this many tokens")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    seed: int = Field(0, ge=0, description="seeds the sampler, data order and model init")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16 mixed precision, or fp32 (CPU without bf16 support)"
    )
    activation_checkpointing: bool = Field(False, description="recompute activations: less memory")
    optimizer: OptimizerSpec = OptimizerSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    eval: EvalSpec = EvalSpec()
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="raw DeepSpeed config merged over the generated one (experts only)",
    )
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus port; 0: off")

    @model_validator(mode="after")
    def _has_a_stop(self) -> TrainingSpec:
        if self.max_samples is None and self.max_tokens is None and self.max_steps is None:
            raise FieldError("maxSamples", "set at least one of maxSamples, maxTokens, maxSteps")
        if self.total_samples < self.global_batch_size:
            raise FieldError("maxSamples", "the run is shorter than one global batch")
        if self.global_batch_size % self.micro_batch_size:
            raise FieldError("globalBatchSize", "must be a multiple of microBatchSize")
        return self

    @property
    def total_samples(self) -> int:
        """Samples the run trains on: the earliest of its stop conditions."""
        limits = [self.max_samples]
        if self.max_tokens is not None:
            limits.append(-(-self.max_tokens // self.seq_length))
        if self.max_steps is not None:
            limits.append(self.max_steps * self.global_batch_size)
        return min(x for x in limits if x is not None)

    @property
    def total_steps(self) -> int:
        """Optimizer steps: whole global batches within `total_samples`."""
        return self.total_samples // self.global_batch_size


# --- the run -----------------------------------------------------------------------------------


class ChatFlowRunSpec(_Spec):
    model: ModelSpec
    data: DataSpec
    schedule: ScheduleSpec
    training: TrainingSpec

    @model_validator(mode="after")
    def _weights_name_sources(self) -> ChatFlowRunSpec:
        names = {s.name for s in self.data.sources}
        for path, weights in self.schedule.weight_sets():
            for source in weights:
                if source not in names:
                    raise FieldError(
                        f"schedule.{path}.{source}",
                        f"unknown source {source!r} (sources: {', '.join(sorted(names))})",
                    )
        return self

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.data.sources)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    namespace: str | None = None


class ChatFlowRun(_Spec):
    api_version: Literal["chatflow.io/v1alpha1"]
    kind: Literal["ChatFlowRun"]
    metadata: ObjectMeta
    spec: ChatFlowRunSpec


# --- loading and errors ------------------------------------------------------------------------


class SpecError(Exception):
    """Invalid input; `str()` is one line per problem, each naming the field."""


def _field_path(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _parse_path(path: str) -> tuple[str | int, ...]:
    parts = re.findall(r"\[(\d+)\]|([^.\[\]]+)", path)
    return tuple(int(index) if index else name for index, name in parts)


def format_errors(error: ValidationError) -> list[str]:
    """One line per problem: `spec.data.sources[1].path: required field is missing`."""
    lines = []
    for e in error.errors():
        loc, message = tuple(e["loc"]), e["msg"]
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            loc, message = (*loc, *_parse_path(cause.path)), cause.message
        elif e["type"] == "missing":
            message = "required field is missing"
        elif e["type"] == "extra_forbidden":
            message = "unknown field"
        elif e["type"] == "literal_error":
            message = f"got {e['input']!r}; {message[0].lower()}{message[1:]}"
        lines.append(f"{_field_path(loc)}: {message}")
    return lines


def parse_run(document: Any) -> ChatFlowRun:
    """Validate a ChatFlowRun manifest (already parsed from YAML) or raise SpecError."""
    if not isinstance(document, dict):
        raise SpecError("manifest: expected a ChatFlowRun mapping")
    try:
        return ChatFlowRun.model_validate(document)
    except ValidationError as e:
        raise SpecError("\n".join(format_errors(e))) from None


def load_run(path: str | Path) -> ChatFlowRun:
    """Read and validate a ChatFlowRun manifest file."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_run(document)
