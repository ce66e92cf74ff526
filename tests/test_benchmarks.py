"""The benchmarks that need hardware CI does not have still run here, on a toy scale, so they
cannot rot before someone runs them for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_gpu_benchmark_smoke(tmp_path: Path) -> None:
    """`benchmarks/gpu.py --smoke`: both sides (the trainer's step and Hugging Face's Trainer with
    DeepSpeed) train a tiny model on CPU and report comparable results."""
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py"), "--smoke", "--work", str(tmp_path / "models"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "ours / baseline tokens/s" in done.stdout
    (baseline, ours), *_ = json.loads(out.read_text())["rounds"]
    assert (baseline["side"], ours["side"]) == ("baseline", "ours")
    assert baseline["parameters"] == ours["parameters"] > 0
    assert baseline["tokens_per_second"] > 0 and ours["tokens_per_second"] > 0
    assert ours["mfu"] is None  # no peak is known for a CPU in fp32
