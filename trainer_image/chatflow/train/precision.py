"""`spec.training.precision: auto`: bf16 where the device computes in bf16 natively, else fp32.

Where bf16 is emulated it is not a saving but a large cost: on a CPU without AMX or AVX512_BF16
every bf16 matmul converts to fp32 and back, and the tiny example trained 10-15x slower in bf16
than in fp32 on a 2-core AVX2 EPYC (about 2x slower on an AVX-512 Xeon without bf16). GPUs from
Ampere on, and CPUs with `amx_bf16` (Sapphire Rapids and later) or `avx512_bf16` (Cooper Lake,
Zen 4 and later), compute in bf16 natively.

A resumed run keeps the precision of its checkpoint: DeepSpeed loads a checkpoint only in the
precision that saved it (ZeRO names its shards by it), so under "auto" a job restarted on other
nodes must not switch.

`resolve` is the decision, a pure function of what the device offers and what the checkpoint was
saved in; `detect` reads the device from this machine; `for_job` makes every rank of a job agree.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from chatflow.spec import SpecError
from chatflow.train import distributed

Resolved = Literal["bf16", "fp32"]

# /proc/cpuinfo flags of the x86 instructions that compute bf16 matmuls natively (oneDNN uses them).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    name: Resolved
    reason: str  # short and from a fixed set: it is also a metric label


def resolve(
    requested: str,
    gpu_bf16: bool | None,
    cpu_flags: Collection[str],
    saved: str | None = None,
) -> Precision:
    """The precision to train in: `requested`, or for "auto" the device's native one.

    `gpu_bf16` is whether the GPU computes bf16 natively, None when training on CPU; `cpu_flags`
    are the CPU's feature flags as /proc/cpuinfo lists them; `saved` is the precision of the
    checkpoint the run resumes from (None: a new run, or a checkpoint that does not say).
    """
    if requested != "auto":
        if saved is not None and saved != requested:
            raise SpecError(
                f"spec.training.precision: {requested}, but the checkpoint to resume was saved in "
                f"{saved}, and DeepSpeed loads it only in that: set {saved} or auto"
            )
        return Precision(requested, "set in spec.training.precision")
    if saved is not None:
        return Precision(saved, "auto: the precision of the checkpoint resumed")
    if gpu_bf16 is not None:
        if gpu_bf16:
            return Precision("bf16", "auto: the GPU computes bf16 natively")
        return Precision("fp32", "auto: the GPU has no native bf16")
    native = next((flag for flag in CPU_BF16_FLAGS if flag in cpu_flags), None)
    if native:
        return Precision("bf16", f"auto: the CPU has {native}")
    return Precision("fp32", "auto: the CPU has no amx_bf16 or avx512_bf16")


def detect() -> tuple[bool | None, frozenset[str]]:
    """`resolve`'s view of this machine: (GPU bf16 support or None without a GPU, CPU flags)."""
    gpu_bf16 = None
    if torch.cuda.is_available():
        # Not counting emulation: pre-Ampere GPUs "support" bf16 at a fraction of fp32's speed.
        gpu_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return gpu_bf16, cpu_flags()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags; empty where there is no /proc/cpuinfo (not Linux).

    The kernel lists the AMX flags only where it supports AMX's register state (Linux 5.16 on), so
    a flag listed here is one oneDNN can use. torch's public `get_cpu_capability()` names only the
    vector width (AVX2, AVX512) and says nothing about bf16.
    """
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return frozenset()
    # x86 names the line "flags"; every core repeats it, so the first is enough.
    line = next((line for line in lines if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def for_job(requested: str, world_size: int, saved: str | None = None) -> Precision:
    """This machine's `resolve`, made the same on every rank.

    Ranks must agree, or their gradients' dtypes differ in the all-reduce: under "auto" a job
    whose nodes differ (a CPU pool of mixed generations) trains in bf16 only if every rank has it.
    (The spec and the checkpoint are the same on every rank: only the devices can differ.)
    """
    mine = resolve(requested, *detect(), saved)
    if requested != "auto" or saved is not None:
        return mine
    everywhere = distributed.all_sum(torch.tensor([mine.name == "bf16"]))[0] == world_size
    if mine.name == "bf16" and not everywhere:
        return Precision("fp32", "auto: not every node has native bf16")
    return mine
