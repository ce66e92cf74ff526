"""The DeepSpeed config, generated from the spec's `training` section."""

from __future__ import annotations

import copy
from typing import Any

from chatflow.data.sources import first_line
from chatflow.spec import SpecError, TrainingSpec
from chatflow.train.precision import Resolved, detect, resolve


def gradient_accumulation(training: TrainingSpec, world_size: int) -> int:
    """Micro-steps per optimizer step that make up the global batch on `world_size` processes."""
    per_step = world_size * training.micro_batch_size
    if training.global_batch_size % per_step:
        raise SpecError(
            f"spec.training.globalBatchSize: {training.global_batch_size} is not a multiple of "
            f"{world_size} processes x microBatchSize {training.micro_batch_size}"
        )
    return training.global_batch_size // per_step


def deepspeed_config(
    training: TrainingSpec, world_size: int, precision: Resolved | None = None
) -> dict[str, Any]:
    """The generated config with `training.deepspeed` merged over it (nested keys merge).

    `precision` is `training.precision` resolved for the job (`chatflow.train.precision`); left
    out, it is resolved for this machine.
    """
    precision = precision or resolve(training.precision, *detect()).name
    optimizer = training.optimizer
    generated = {
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation(training, world_size),
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": {
            "stage": training.zero_stage,
            # ZeRO-3 shards the weights; the final save_pretrained needs them whole.
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optimizer.lr,
                "betas": list(optimizer.betas),
                "eps": 1e-8,
                "weight_decay": optimizer.weight_decay,
                # torch's AdamW: DeepSpeed's fused CPU Adam would need a C++ compiler at run time.
                "torch_adam": True,
                # torch's fused kernel (CPU and GPU), one pass over the weights instead of
                # foreach's several: the tiny example's step on 2 CPU cores is ~3% shorter.
                "fused": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # the trainer reports progress itself
        "wall_clock_breakdown": False,
    }
    return _merge(generated, training.deepspeed)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_problem(error: Exception) -> str:
    """One line from DeepSpeed's config errors (pydantic ones name the offending key)."""
    errors: Any = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return first_line(error)
