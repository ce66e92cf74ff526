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
from pydantic.alias_generators import to_camel, to_snake

from chatflow import __version__
from chatflow.metric_names import PRECISION_INFO

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


def cel(*rules: tuple[str, str, str]) -> ConfigDict:
    """The CEL twins of a model validator's checks, as (field, rule, message).

    The CRD generator copies them into the schema as `x-kubernetes-validations`, so the API server
    rejects at admission what the validator rejects at load, naming the same field (`field` is
    relative to the model; "" for the model itself). tests/test_admission.py applies every bad
    manifest of tests/test_spec.py to a real API server to keep the two in step.
    """
    validations = [
        {"rule": rule, "message": message} | ({"fieldPath": f".{field}"} if field else {})
        for field, rule, message in rules
    ]
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": validations})


# Bounds on list and map sizes: the API server prices every CEL rule by the largest input the
# schema allows and refuses rules whose worst case is too expensive.
MAX_SOURCES = 64
MAX_SCHEDULE_ENTRIES = 256

Language = Annotated[str, Field(pattern=LANGUAGE_PATTERN, description="ISO 639 code, e.g. en, zh")]
Weight = Annotated[float, Field(ge=0, description="relative weight, normalised to sum 1")]
Weights = Annotated[
    dict[str, Weight],
    Field(
        max_length=MAX_SOURCES,
        description="relative weight of each source, by name; normalised to sum 1",
    ),
]
POSITIVE_WEIGHT = "needs at least one positive weight"


# --- model -------------------------------------------------------------------------------------


class ExtendVocab(_Spec):
    """Add tokens (ChatFlow: 8,076 Chinese characters) before training."""

    tokens_file: str = Field(
        min_length=1,
        description="UTF-8 file, one new token per line; each new embedding row starts as the "
        "mean of the rows of the old tokens it used to split into",
    )


class ModelSpec(_Spec):
    """The causal LM to continue training (LLaMA-2 in ChatFlow) and its tokenizer."""

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


_PLACEHOLDER_LIST = ", ".join(f"'{{{p}}}'" for p in PARALLEL_PLACEHOLDERS)


class SourceSpec(_Spec):
    """One corpus. `kind` decides how its records become training tokens."""

    model_config = cel(
        ("language", "self.kind != 'pretrain' || has(self.language)", "required for kind pretrain"),
        (
            "format",
            "self.kind != 'instruction' || has(self.format)",
            "required for kind instruction",
        ),
        (
            "languages",
            "self.kind != 'parallel' || has(self.languages)",
            "required for kind parallel",
        ),
        ("fields", "self.kind != 'parallel' || has(self.fields)", "required for kind parallel"),
        (
            "language",
            "self.kind != 'parallel' || !has(self.language)",
            "only allowed for kind pretrain/instruction",
        ),
        (
            "languages",
            "self.kind == 'parallel' || !has(self.languages)",
            "only allowed for kind parallel",
        ),
        (
            "fields",
            "self.kind == 'parallel' || !has(self.fields)",
            "only allowed for kind parallel",
        ),
        (
            "format",
            "self.kind == 'instruction' || !has(self.format)",
            "only allowed for kind instruction",
        ),
        (
            "chatTemplate",
            "self.kind == 'instruction' || !has(self.chatTemplate)",
            "only allowed for kind instruction",
        ),
        (
            "template",
            "self.kind != 'parallel' || "
            f"self.template.findAll('[{{][A-Za-z0-9_]*[}}]').all(p, p in [{_PLACEHOLDER_LIST}])",
            "unknown placeholder; use " + ", ".join(f"{{{p}}}" for p in PARALLEL_PLACEHOLDERS),
        ),
        (
            "template",
            "self.kind != 'parallel' || "
            "(self.template.contains('{source}') && self.template.contains('{target}'))",
            "must contain {source} and {target}",
        ),
    )

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=63,
        description="the source's name in schedules, metrics and logs",
    )
    kind: Literal["pretrain", "parallel", "instruction"] = Field(
        description="pretrain: plain text; parallel: translation pairs rendered through "
        "`template`; instruction: conversations trained on the assistant's turns only"
    )
    path: str = Field(
        min_length=1,
        description="Hugging Face hub dataset id, or a local file, directory or glob "
        "(.json, .jsonl, .parquet, .txt, .arrow); relative paths are relative to the manifest",
    )
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="dataset split to read")
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
        max_length=1024,
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


GPU_RESOURCE = "nvidia.com/gpu"
Quantity = Annotated[int | str, Field(description="a Kubernetes quantity such as 8, 500m, 64Gi")]


class Resources(_Spec):
    """Per-node (per pod) CPU, memory and other resources; GPUs come from `gpusPerNode`."""

    model_config = cel(
        *(
            (
                kind,
                f"!has(self.{kind}) || !('{GPU_RESOURCE}' in self.{kind})",
                "set gpusPerNode instead",
            )
            for kind in ("requests", "limits")
        )
    )

    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="e.g. cpu: 32, memory: 512Gi"
    )
    limits: dict[str, Quantity] = Field(default_factory=dict, description="e.g. memory: 1Ti")

    @model_validator(mode="after")
    def _no_gpus(self) -> Resources:
        for kind in ("requests", "limits"):
            if GPU_RESOURCE in getattr(self, kind):
                raise FieldError(kind, "set gpusPerNode instead")
        return self


class Preparation(_Spec):
    """Tokenizing and packing the sources, before training, only as far as the run needs.

    On Kubernetes it is a Job of its own (CPU pods on the run's volume) that runs before the
    PyTorchJob, or a TrainJob's dataset-initializer step (whose resources are the runtime's);
    `chatflow train` does it in place. See docs/data.md.
    """

    workers: int = Field(
        2, ge=1, le=256, description="processes that tokenize and pack in parallel (one CPU each)"
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="the preparation pod's resources; default: cpu and 2Gi of memory per worker",
    )


class DataSpec(_Spec):
    """The corpora the dynamic sampler draws from."""

    sources: list[SourceSpec] = Field(
        description="the corpora, each named and of one kind",
        min_length=1,
        max_length=MAX_SOURCES,
        # A list keyed by name: the API server itself rejects a duplicate name.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    preparation: Preparation = Preparation()

    @model_validator(mode="after")
    def _unique_names(self) -> DataSpec:
        seen: set[str] = set()
        for i, source in enumerate(self.sources):
            if source.name in seen:
                raise FieldError(f"sources[{i}].name", f"duplicate source name {source.name!r}")
            seen.add(source.name)
        return self


# --- schedule ----------------------------------------------------------------------------------


def _has_positive_weight(field: str) -> tuple[str, str, str]:
    return (field, f"self.{field}.exists(k, self.{field}[k] > 0.0)", POSITIVE_WEIGHT)


def _strictly_increasing(items: str, key: str) -> str:
    """CEL: the `key` values present in list `items` are sorted and distinct."""
    values = f"self.{items}.map(e, has(e.{key}), e.{key})"
    return f"{values}.isSorted() && {values}.all(v, {values}.filter(w, w == v).size() == 1)"


class Stage(_Spec):
    model_config = cel(_has_positive_weight("weights"))

    name: str | None = Field(None, pattern=NAME_PATTERN, description="defaults to stage-<index>")
    until: int | None = Field(
        None, gt=0, description="progress at which the stage ends; unset on the last stage"
    )
    weights: Weights


class Point(_Spec):
    model_config = cel(_has_positive_weight("weights"))

    at: int = Field(ge=0, description="progress at which the mixture equals `weights`")
    weights: Weights


_CURVE_FIELDS = {"growth": ("linear", "cosine"), "start": ("linear", "cosine")}
_CURVE_FIELDS |= {"end": ("linear", "cosine"), "stages": ("stages",), "points": ("points",)}


class ScheduleSpec(_Spec):
    """Target mixture as a function of progress (samples or tokens consumed)."""

    model_config = cel(
        *(
            (
                field,
                f"!(self.curve in {list(curves)}) || has(self.{field})",
                "required for this curve",
            )
            for field, curves in _CURVE_FIELDS.items()
        ),
        *(
            (field, f"self.curve in {list(curves)} || !has(self.{field})", "not used by this curve")
            for field, curves in _CURVE_FIELDS.items()
        ),
        ("start", "!has(self.start) || self.start.exists(k, self.start[k] > 0.0)", POSITIVE_WEIGHT),
        ("end", "!has(self.end) || self.end.exists(k, self.end[k] > 0.0)", POSITIVE_WEIGHT),
        (
            "stages",
            "!has(self.stages) || "
            "self.stages.all(s, has(s.until) || s == self.stages[size(self.stages) - 1])",
            "until is required on every stage but the last",
        ),
        (
            "stages",
            f"!has(self.stages) || ({_strictly_increasing('stages', 'until')})",
            "until must increase from stage to stage",
        ),
        (
            "points",
            f"!has(self.points) || ({_strictly_increasing('points', 'at')})",
            "at must increase from point to point",
        ),
    )

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
    stages: list[Stage] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SCHEDULE_ENTRIES,
        description="stages: constant mixtures, each until a progress",
    )
    points: list[Point] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SCHEDULE_ENTRIES,
        description="points: mixtures at progresses, linear in between",
    )

    @model_validator(mode="after")
    def _shape_of_curve(self) -> ScheduleSpec:
        for name, curves in _CURVE_FIELDS.items():
            if self.curve in curves and getattr(self, name) is None:
                raise FieldError(name, f"required for curve {self.curve}")
        for name, curves in _CURVE_FIELDS.items():
            if self.curve not in curves and getattr(self, name) is not None:
                raise FieldError(name, f"not used by curve {self.curve}")
        for path, weights in self.weight_sets():
            if not any(weights.values()):
                raise FieldError(path, POSITIVE_WEIGHT)
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
    """Sequence length, batch sizes, how long to train, and DeepSpeed settings."""

    model_config = cel(
        (
            "maxSamples",
            "has(self.maxSamples) || has(self.maxTokens) || has(self.maxSteps)",
            "set at least one of maxSamples, maxTokens, maxSteps",
        ),
        (
            "maxSamples",
            "!has(self.maxSamples) || self.maxSamples >= self.globalBatchSize",
            "the run is shorter than one global batch",
        ),
        (
            "maxTokens",
            "!has(self.maxTokens) || self.maxTokens > (self.globalBatchSize - 1) * self.seqLength",
            "the run is shorter than one global batch",
        ),
        (
            "globalBatchSize",
            "self.globalBatchSize % self.microBatchSize == 0",
            "must be a multiple of microBatchSize",
        ),
    )

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
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description=(
            "bf16 (mixed precision), fp32, or auto: bf16 where the devices compute it natively "
            "(GPUs with bf16 support, CPUs with AMX or AVX512_BF16), else fp32, as emulated bf16 "
            "is many times slower. The trainer logs its choice and why, and exports them as "
            f"{PRECISION_INFO}"
        ),
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in backward: less memory, more compute",
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description=(
            "attention kernel: sdpa (PyTorch's scaled_dot_product_attention, flash kernels on "
            "GPUs), flash_attention_2 (needs the flash-attn package), eager, or auto: "
            "flash_attention_2 on GPUs where flash-attn is installed, else sdpa"
        ),
    )
    compile: bool = Field(
        False,
        description="torch.compile the model: faster steps on GPUs after a slow first one",
    )
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
        if self.max_samples is not None and self.max_samples < self.global_batch_size:
            raise FieldError("maxSamples", "the run is shorter than one global batch")
        if self.max_tokens is not None and self.max_tokens <= (
            (self.global_batch_size - 1) * self.seq_length
        ):
            raise FieldError("maxTokens", "the run is shorter than one global batch")
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


# --- the cluster: what the operator needs to run the trainer as a PyTorchJob -------------------
# The trainer ignores these; `chatflow train` runs locally without them. Field names and shapes
# follow the core Kubernetes types they end up in, so they read as users expect.

DEFAULT_IMAGE = f"ghcr.io/chatflow/trainer:{__version__}"


class Storage(_Spec):
    """A PersistentVolumeClaim shared by all nodes (ReadWriteMany) for checkpoints and caches.

    The run writes to `<mountPath>/runs/<run name>` (checkpoints, final model) and
    `<mountPath>/cache` (packed data, shared between runs). Without it they live in an emptyDir
    and a restarted job starts over.
    """

    claim_name: str = Field(pattern=NAME_PATTERN, max_length=253, description="the PVC's name")
    mount_path: str = Field("/data", pattern=r"^/", description="where the pods mount it")


class KeyRef(_Spec):
    name: str = Field(min_length=1, description="the Secret's or ConfigMap's name")
    key: str = Field(min_length=1)
    optional: bool = False


class EnvValueFrom(_Spec):
    model_config = cel(
        ("", "has(self.secretKeyRef) != has(self.configMapKeyRef)", "set exactly one reference")
    )

    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvValueFrom:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise FieldError("", "set exactly one reference")
        return self


class EnvVar(_Spec):
    """An environment variable of the trainer, e.g. HF_TOKEN from a Secret."""

    model_config = cel(("", "has(self.value) != has(self.valueFrom)", "set value or valueFrom"))

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)
    value: str | None = None
    value_from: EnvValueFrom | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise FieldError("", "set value or valueFrom")
        return self


class Toleration(_Spec):
    model_config = cel(
        ("value", "self.operator != 'Exists' || !has(self.value)", "not allowed with Exists")
    )

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _value(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise FieldError("value", "not allowed with Exists")
        return self


class Scheduling(_Spec):
    """Where the pods may run; passed to every pod of the job as written."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels the pods require"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="taints the pods tolerate (e.g. nvidia.com/gpu)"
    )
    affinity: dict[str, Any] | None = Field(
        None,
        description="a core/v1 Affinity, passed through unchecked",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(None, description="the pods' PriorityClass")


class RunPolicy(_Spec):
    """The job's run policy; changing it does not restart the run. A TrainJob takes only
    activeDeadlineSeconds: its runtime's JobSet decides restarts and clean-up."""

    backoff_limit: int | None = Field(
        None, ge=0, description="job restarts (e.g. after preemption) before the run fails"
    )
    active_deadline_seconds: int | None = Field(
        None, gt=0, description="fail the job after running this long"
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="delete the finished job's pods after this long"
    )


# RunPolicy fields a TrainJob has no counterpart for (as they appear in the manifest).
TRAINJOB_UNSUPPORTED_RUN_POLICY = ("backoffLimit", "ttlSecondsAfterFinished")


# --- the run -----------------------------------------------------------------------------------


class ChatFlowRunSpec(_Spec):
    model_config = cel(
        *(
            (
                f"schedule.{field}",
                f"!has(self.schedule.{field}) || "
                f"self.schedule.{field}.all(k, self.data.sources.exists(s, s.name == k))",
                "names a source that is not in data.sources",
            )
            for field in ("start", "end")
        ),
        *(
            (
                f"schedule.{field}",
                f"!has(self.schedule.{field}) || self.schedule.{field}.all(e, "
                "e.weights.all(k, self.data.sources.exists(s, s.name == k)))",
                "names a source that is not in data.sources",
            )
            for field in ("stages", "points")
        ),
        (
            "storage",
            "self.backend != 'trainjob' || has(self.storage)",
            "required with backend trainjob: its dataset-initializer prepares the data on it",
        ),
        (
            "scheduling.priorityClassName",
            "self.backend != 'trainjob' || !has(self.scheduling.priorityClassName)",
            "not supported with backend trainjob: set it in the ClusterTrainingRuntime",
        ),
        *(
            (
                f"runPolicy.{field}",
                f"self.backend != 'trainjob' || !has(self.runPolicy.{field})",
                "not supported with backend trainjob: the ClusterTrainingRuntime's JobSet decides",
            )
            for field in TRAINJOB_UNSUPPORTED_RUN_POLICY
        ),
    )

    model: ModelSpec
    data: DataSpec
    schedule: ScheduleSpec
    training: TrainingSpec

    suspend: bool = Field(
        False, description="stop the job (a checkpoint is saved); unset it to resume"
    )
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="the trainer image")
    nodes: int = Field(1, ge=1, le=1024, description="pods: 1 master plus nodes-1 workers")
    gpus_per_node: int = Field(
        0, ge=0, le=64, description="GPUs (and trainer processes) per node; 0: one CPU process"
    )
    resources: Resources = Resources()
    storage: Storage | None = None
    env: list[EnvVar] = Field(
        default_factory=list, description="the trainer's environment, e.g. HF_TOKEN from a Secret"
    )
    scheduling: Scheduling = Scheduling()
    queue_name: str | None = Field(
        None, description="Kueue LocalQueue: Kueue admits (unsuspends) the job when it fits"
    )
    run_policy: RunPolicy = RunPolicy()
    backend: Literal["pytorchjob", "trainjob"] = Field(
        "pytorchjob",
        description="the job that trains: a Kubeflow PyTorchJob (training-operator v1), or a "
        "Kubeflow Trainer v2 TrainJob on the chart's ClusterTrainingRuntime `chatflow`, which "
        "needs storage",
    )

    @model_validator(mode="after")
    def _backend_supports(self) -> ChatFlowRunSpec:
        if self.backend != "trainjob":
            return self
        if self.storage is None:
            raise FieldError(
                "storage",
                "required with backend trainjob: its dataset-initializer prepares the data on it",
            )
        if self.scheduling.priority_class_name is not None:
            raise FieldError(
                "scheduling.priorityClassName",
                "not supported with backend trainjob: set it in the ClusterTrainingRuntime",
            )
        for field in TRAINJOB_UNSUPPORTED_RUN_POLICY:
            if getattr(self.run_policy, to_snake(field)) is not None:
                raise FieldError(
                    f"runPolicy.{field}",
                    "not supported with backend trainjob: the ClusterTrainingRuntime's JobSet "
                    "decides",
                )
        return self

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


# A run's job is named `<run>-<hash>`, and its pods `<job>-worker-<n>`: within a DNS label's 63.
MAX_RUN_NAME = 45


# --- status: written by the operator ------------------------------------------------------------

Phase = Literal["Preparing", "Pending", "Running", "Suspended", "Restarting", "Succeeded", "Failed"]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class Condition(_Spec):
    """A Kubernetes condition; those of the job's are mirrored with their reasons."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: Timestamp | None = None
    observed_generation: int | None = None


class MixtureProgress(_Spec):
    """Where the dynamic sampler is, read from rank 0's metrics while the job runs."""

    fraction: float = Field(ge=0, le=1, description="share of the run's samples trained on")
    schedule_fraction: float = Field(
        ge=0, le=1, description="how far the mixture has moved through the schedule's changes"
    )
    schedule_phase: str | None = Field(None, description="current phase of the schedule")
    step: int = Field(ge=0, description="optimizer steps completed")
    samples: int = Field(ge=0, description="samples trained on")
    tokens: int = Field(ge=0, description="tokens trained on")
    target_weights: dict[str, float] = Field(
        default_factory=dict, description="the schedule's current weight of each source"
    )
    last_checkpoint_step: int | None = Field(None, description="step of the newest checkpoint")
    updated_at: Timestamp = Field(description="when the trainer's metrics were read")


class PreparationProgress(_Spec):
    """The data preparation Job's progress, summed over sources, read from its pod's metrics."""

    shards_done: int = Field(ge=0, description="shards of the run's need tokenized and packed")
    shards_total: int = Field(ge=0, description="shards the run needs; an estimate until read")
    tokens: int = Field(ge=0, description="tokens written to packed blocks")
    documents: int = Field(ge=0, description="documents tokenized")
    updated_at: Timestamp = Field(description="when the preparation's metrics were read")


class ChatFlowRunStatus(_Spec):
    phase: Phase = "Pending"
    observed_generation: int | None = Field(
        None, description="the generation of the spec this status describes"
    )
    job_name: str | None = Field(
        None,
        description="the job (PyTorchJob or TrainJob) running this spec (with a PyTorchJob and "
        "storage, `<jobName>-prep` is the Job that prepares its data first)",
    )
    restarts: int = Field(0, ge=0, description="jobs replaced after restart-worthy spec changes")
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: MixtureProgress | None = None
    preparation: PreparationProgress | None = None


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_RUN_NAME)
    namespace: str | None = None


class ChatFlowRun(_Spec):
    model_config = cel(
        (
            "",  # a CRD may not point a fieldPath into metadata, so the message names the field
            f"self.metadata.name.size() <= {MAX_RUN_NAME}",
            f"metadata.name: at most {MAX_RUN_NAME} characters (the job's pods are named after it)",
        )
    )

    api_version: Literal["chatflow.io/v1alpha1"]
    kind: Literal["ChatFlowRun"]
    metadata: ObjectMeta
    spec: ChatFlowRunSpec
    status: ChatFlowRunStatus | None = None


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
