"""`spec.training.precision`: auto resolves to bf16 where the device computes it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatflow.spec import SpecError, parse_run
from chatflow.train import precision
from chatflow.train.deepspeed_config import deepspeed_config
from chatflow.train.precision import Precision, cpu_flags, for_job, resolve
from factories import run_document

# Flags of real CPUs, trimmed: an AVX2-only EPYC (Zen 2), an Ice Lake Xeon (AVX-512 without bf16),
# a Cooper Lake Xeon (AVX512_BF16) and a Sapphire Rapids Xeon (AMX and AVX512_BF16).
ZEN2 = {"sse4_2", "avx", "avx2", "fma"}
ICE_LAKE = ZEN2 | {"avx512f", "avx512bw", "avx512_vnni"}
COOPER_LAKE = ICE_LAKE | {"avx512_bf16"}
SAPPHIRE_RAPIDS = COOPER_LAKE | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(
    ("requested", "gpu_bf16", "flags", "expected"),
    [
        ("bf16", None, ZEN2, Precision("bf16", "set in spec.training.precision")),
        ("fp32", True, SAPPHIRE_RAPIDS, Precision("fp32", "set in spec.training.precision")),
        ("auto", True, ZEN2, Precision("bf16", "auto: the GPU computes bf16 natively")),
        ("auto", False, SAPPHIRE_RAPIDS, Precision("fp32", "auto: the GPU has no native bf16")),
        ("auto", None, SAPPHIRE_RAPIDS, Precision("bf16", "auto: the CPU has amx_bf16")),
        ("auto", None, COOPER_LAKE, Precision("bf16", "auto: the CPU has avx512_bf16")),
        ("auto", None, ICE_LAKE, Precision("fp32", "auto: the CPU has no amx_bf16 or avx512_bf16")),
        ("auto", None, ZEN2, Precision("fp32", "auto: the CPU has no amx_bf16 or avx512_bf16")),
        ("auto", None, set(), Precision("fp32", "auto: the CPU has no amx_bf16 or avx512_bf16")),
    ],
    ids=[
        "explicit-bf16-on-avx2",
        "explicit-fp32-on-a-bf16-gpu",
        "gpu-bf16",
        "gpu-without-bf16",
        "cpu-amx",
        "cpu-avx512-bf16",
        "cpu-avx512-only",
        "cpu-avx2-only",
        "cpu-unknown",
    ],
)
def test_resolve(requested: str, gpu_bf16: bool | None, flags: set[str], expected: Precision):
    assert resolve(requested, gpu_bf16, flags) == expected


@pytest.mark.parametrize("flags", [ZEN2, SAPPHIRE_RAPIDS])
@pytest.mark.parametrize("saved", ["bf16", "fp32"])
def test_auto_resumes_in_the_checkpoints_precision(saved: str, flags: set[str]) -> None:
    expected = Precision(saved, "auto: the precision of the checkpoint resumed")
    assert resolve("auto", None, flags, saved) == expected


def test_explicit_precision_other_than_the_checkpoints_is_one_line() -> None:
    assert resolve("bf16", None, ZEN2, saved="bf16").name == "bf16"
    with pytest.raises(SpecError) as error:
        resolve("fp32", None, SAPPHIRE_RAPIDS, saved="bf16")
    assert str(error.value) == (
        "spec.training.precision: fp32, but the checkpoint to resume was saved in bf16, and "
        "DeepSpeed loads it only in that: set bf16 or auto"
    )


def test_auto_is_the_default_and_fp16_is_refused() -> None:
    assert parse_run(run_document()).spec.training.precision == "auto"
    with pytest.raises(SpecError, match=r"^spec\.training\.precision: got 'fp16'"):
        parse_run(run_document(training={"maxSteps": 1, "precision": "fp16"}))


def test_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n"
    )
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("resolved", ["bf16", "fp32"])
def test_deepspeed_config_follows_the_resolved_precision(resolved: str) -> None:
    training = parse_run(run_document()).spec.training
    config = deepspeed_config(training, world_size=1, precision=resolved)
    assert config["bf16"] == {"enabled": resolved == "bf16"}


@pytest.mark.parametrize(("flags", "bf16"), [(ZEN2, False), (SAPPHIRE_RAPIDS, True)])
def test_deepspeed_config_resolves_for_this_machine_by_default(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], bf16: bool
) -> None:
    monkeypatch.setattr("chatflow.train.deepspeed_config.detect", lambda: (None, frozenset(flags)))
    training = parse_run(run_document()).spec.training
    assert deepspeed_config(training, world_size=1)["bf16"] == {"enabled": bf16}


def test_for_job_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "detect", lambda: (None, frozenset(COOPER_LAKE)))
    assert for_job("auto", world_size=1) == Precision("bf16", "auto: the CPU has avx512_bf16")
    assert for_job("fp32", world_size=1).name == "fp32"


def test_for_job_falls_back_to_fp32_unless_every_rank_has_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "detect", lambda: (None, frozenset(SAPPHIRE_RAPIDS)))
    # The other rank of two lacks native bf16: the sum over ranks counts only this one.
    monkeypatch.setattr(precision.distributed, "all_sum", lambda values: values.double())
    fallback = Precision("fp32", "auto: not every node has native bf16")
    assert for_job("auto", world_size=2) == fallback
    assert for_job("bf16", world_size=2).name == "bf16"  # explicit: no vote
    assert for_job("auto", world_size=2, saved="bf16").name == "bf16"  # the checkpoint's: no vote


def test_detect_on_this_machine() -> None:
    gpu_bf16, flags = precision.detect()
    assert gpu_bf16 is None if not torch.cuda.is_available() else isinstance(gpu_bf16, bool)
    assert isinstance(flags, frozenset)
