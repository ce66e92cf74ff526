"""The trainer for real: `chatflow train` -> torchrun -> DeepSpeed on CPU, 2 processes (gloo).

One uninterrupted run is the reference; interrupted and resumed runs must reproduce its loss curve
and its global sample sequence. fp32 keeps the comparison exact (bf16 would add rounding noise).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from factories import tiny_manifest
from outputs import losses, samples

CHATFLOW = str(Path(sys.executable).parent / "chatflow")
TRAINING = {
    "seqLength": 32,
    "globalBatchSize": 8,
    "microBatchSize": 2,
    "maxSteps": 30,
    "seed": 0,
    "zeroStage": 2,
    "precision": "fp32",
    "optimizer": {"lr": 3e-3, "minLr": 3e-4, "warmupSteps": 2},
    "checkpoint": {"everySteps": 4, "keep": 2},
    "eval": {"everySteps": 10, "samplesPerSource": 2},
    "metricsPort": 0,
}
SCHEDULE = {"growth": 120}


@dataclass
class Run:
    output: Path
    process: subprocess.Popen
    log: Path

    def wait(self, timeout: float = 600) -> int:
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.log.read_text()

    def signal(self, signum: int) -> None:
        """Signal torchrun and its workers at once, as a node shutting down does."""
        os.killpg(self.process.pid, signum)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if max(losses(self.output), default=0) >= step:
                return
            assert self.process.poll() is None, self.stderr()
            time.sleep(0.05)
        raise TimeoutError(f"step {step} not reached")


def start(manifest: Path, output: Path, cache: Path, processes: int = 2) -> Run:
    output.mkdir(parents=True, exist_ok=True)
    log = output.parent / f"{output.name}-{time.monotonic_ns()}.log"
    command = [CHATFLOW, "train", "-f", str(manifest), "--output", str(output)]
    command += ["--cache-dir", str(cache), "--nproc", str(processes), "--log-samples"]
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command, stdout=stderr, stderr=stderr, start_new_session=True, env=_env()
        )
    return Run(output, process, log)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def manifests(tiny_example: Path, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("manifests")

    def make(name: str, **training) -> Path:
        return tiny_manifest(
            tiny_example,
            directory / f"{name}.yaml",
            training=TRAINING | training,
            schedule=SCHEDULE,
        )

    return make


@pytest.fixture(scope="module")
def reference(manifests, tmp_path_factory, cache_dir: Path) -> tuple[Path, dict[str, list]]:
    """An uninterrupted run, and its metrics scraped while it ran."""
    port = free_port()
    run = start(
        manifests("reference", metricsPort=port), tmp_path_factory.mktemp("ref") / "out", cache_dir
    )
    run.wait_for_step(12)
    scraped = scrape(port)
    assert run.wait() == 0, run.stderr()
    return run.output, scraped


def test_loss_decreases_with_zero2_on_two_processes(reference) -> None:
    curve = losses(reference[0])
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, curve


def test_every_step_trains_on_exactly_its_global_batch(reference) -> None:
    steps = samples(reference[0])
    assert [steps[s] for s in range(1, 31)] == [
        list(range(8 * (s - 1), 8 * s)) for s in range(1, 31)
    ]


def test_metrics_during_the_run(reference) -> None:
    _, metrics = reference
    values = {
        name: {tuple(sorted(s.labels.items())): s.value for s in ss} for name, ss in metrics.items()
    }
    sources = ("en-web", "zh-web", "zh-en", "sft", "chat")
    for family in (
        "chatflow_schedule_progress_ratio",
        "chatflow_schedule_phase",
        "chatflow_schedule_phase_info",
        "chatflow_mixture_target_ratio",
        "chatflow_mixture_realised_ratio",
        "chatflow_source_samples",
        "chatflow_source_tokens",
        "chatflow_source_epochs",
        "chatflow_samples",
        "chatflow_tokens",
        "chatflow_step",
        "chatflow_loss",
        "chatflow_learning_rate",
        "chatflow_grad_norm",
        "chatflow_samples_per_second",
        "chatflow_tokens_per_second",
        "chatflow_checkpoints",
        "chatflow_checkpoint_duration_seconds",
        "chatflow_heldout_loss",
        "chatflow_heldout_perplexity",
    ):
        assert family in metrics, family
    step = next(iter(values["chatflow_step"].values()))
    assert step >= 12
    samples_total = next(iter(values["chatflow_samples"].values()))
    per_source = {dict(k)["source"]: v for k, v in values["chatflow_source_samples"].items()}
    assert set(per_source) == set(sources)
    assert sum(per_source.values()) == samples_total >= 8 * step
    tokens_total = next(iter(values["chatflow_tokens"].values()))
    assert sum(v for k, v in values["chatflow_source_tokens"].items()) == tokens_total > 0
    assert sum(values["chatflow_mixture_target_ratio"].values()) == pytest.approx(1.0)
    assert 0 < next(iter(values["chatflow_schedule_progress_ratio"].values())) <= 1
    assert all(0 < v < 20 for v in values["chatflow_heldout_loss"].values())
    assert next(iter(values["chatflow_tokens_per_second"].values())) > 0
    (precision,) = metrics["chatflow_precision_info"]  # the manifest sets fp32: it wins
    assert precision.labels["precision"] == "fp32"
    assert precision.labels["reason"] == "set in spec.training.precision"


def test_final_model_loads_with_from_pretrained_and_generates(reference) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = reference[0] / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer) == 32000 + 2000  # the extended vocabulary
    prompt = tokenizer("中国", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, min_new_tokens=5, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_sigterm_checkpoints_and_resume_reproduces_the_run(
    reference, manifests, tmp_path, cache_dir
):
    manifest = manifests("sigterm")
    run = start(manifest, tmp_path / "out", cache_dir)
    run.wait_for_step(6)
    run.signal(signal.SIGTERM)
    assert run.wait() != 0  # preempted: the job must restart it, not count it done
    stopped = max(losses(run.output))
    assert stopped < 30
    assert (run.output / "checkpoints" / f"step-{stopped:08d}" / "trainer.json").exists()
    resumed = start(manifest, run.output, cache_dir)
    assert resumed.wait() == 0, resumed.stderr()
    assert losses(run.output) == losses(reference[0])
    assert samples(run.output) == samples(reference[0])


def test_sigkill_leaves_no_usable_partial_checkpoint(reference, manifests, tmp_path, cache_dir):
    manifest = manifests("sigkill")
    run = start(manifest, tmp_path / "out", cache_dir)
    run.wait_for_step(10)
    run.signal(signal.SIGKILL)
    run.wait()
    checkpoints = run.output / "checkpoints"
    # What a kill in the middle of a save leaves: shards without the trainer state.
    (checkpoints / ".incomplete" / "step-00000099").mkdir(parents=True)
    (checkpoints / "step-00000098").mkdir()
    resumed = start(manifest, run.output, cache_dir)
    assert resumed.wait() == 0, resumed.stderr()
    assert "resumed" in resumed.stderr()
    assert losses(run.output) == losses(reference[0])
    assert samples(run.output) == samples(reference[0])


def test_resume_on_one_process_continues_the_sequence(reference, manifests, tmp_path, cache_dir):
    manifest = manifests("shrink")
    run = start(manifest, tmp_path / "out", cache_dir, processes=2)
    run.wait_for_step(6)
    run.signal(signal.SIGTERM)
    run.wait()
    resumed = start(manifest, run.output, cache_dir, processes=1)
    assert resumed.wait() == 0, resumed.stderr()
    assert samples(run.output) == samples(reference[0])
    # The same samples and the same gradients, summed in another order: equal to rounding.
    got, expected = losses(run.output), losses(reference[0])
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=1e-4), step


@pytest.fixture(scope="module")
def zero3_reference(manifests, tmp_path_factory, cache_dir: Path) -> Path:
    """An uninterrupted ZeRO-3 run: the model partitioned from the moment it is loaded."""
    run = start(
        manifests("zero3", zeroStage=3, maxSteps=12), tmp_path_factory.mktemp("z3"), cache_dir
    )
    assert run.wait() == 0, run.stderr()
    return run.output


def test_zero3_trains_and_saves_a_loadable_model(zero3_reference: Path) -> None:
    from transformers import AutoModelForCausalLM

    curve = losses(zero3_reference)
    assert curve[12] < curve[1] - 0.5, curve
    model = AutoModelForCausalLM.from_pretrained(zero3_reference / "model")
    assert model.config.vocab_size == 34000


def test_zero3_resumes_and_reproduces_the_run(
    zero3_reference: Path, manifests, tmp_path, cache_dir
) -> None:
    manifest = manifests("zero3-sigterm", zeroStage=3, maxSteps=12)
    run = start(manifest, tmp_path / "out", cache_dir)
    run.wait_for_step(5)
    run.signal(signal.SIGTERM)
    assert run.wait() != 0
    assert max(losses(run.output)) < 12
    resumed = start(manifest, run.output, cache_dir)
    assert resumed.wait() == 0, resumed.stderr()
    assert "resumed" in resumed.stderr()
    assert losses(run.output) == losses(zero3_reference)
    assert samples(run.output) == samples(zero3_reference)


# Run by torchrun on 2 ranks: the run's model loaded partitioned (ZeRO-3), its vocabulary extended,
# and the rows of the new tokens gathered and written by rank 0.
NEW_ROWS_UNDER_ZERO3 = """
import json, sys
from pathlib import Path
import deepspeed, torch
from chatflow.data.pipeline import load_tokenizer
from chatflow.spec import load_run
from chatflow.train import distributed, model
from chatflow.train.deepspeed_config import deepspeed_config

manifest = Path(sys.argv[1])
run = load_run(manifest)
place = distributed.init()
_, new_tokens = load_tokenizer(run.spec, manifest.parent)
config = deepspeed_config(run.spec.training, place.world_size, "fp32")
loaded = model.load_model(run, manifest.parent, new_tokens, config)
weights = [loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight]
assert all(w.numel() == 0 for w in weights)  # partitioned: no rank holds the whole matrix
ids = [t.id for t in new_tokens]
with deepspeed.zero.GatheredParameters(weights):
    rows = [w[ids].tolist() for w in weights] + [w[:100].tolist() for w in weights]
# Every weight and buffer: the whole model's output on a text with old and new tokens.
with deepspeed.zero.GatheredParameters(list(loaded.parameters())):
    logits = loaded(input_ids=torch.tensor([list(range(1, 40)) + ids])).logits
if place.is_main:
    Path(sys.argv[2]).write_text(json.dumps({"rows": rows, "logits": logits.tolist()}))
"""


def test_zero3_vocabulary_extension_gives_the_rows_it_gives_unpartitioned(
    manifests, tmp_path: Path, cache_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from chatflow.data.pipeline import load_tokenizer
    from chatflow.spec import load_run
    from chatflow.vocab import extend_embeddings

    manifest = manifests("zero3-vocab", zeroStage=3)
    script, out = tmp_path / "rows.py", tmp_path / "rows.json"
    script.write_text(NEW_ROWS_UNDER_ZERO3)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*command, str(script), str(manifest), str(out)], capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    partitioned = [torch.tensor(rows) for rows in written["rows"]]

    run = load_run(manifest)
    _, new_tokens = load_tokenizer(run.spec, manifest.parent)
    whole = AutoModelForCausalLM.from_pretrained(
        manifest.parent / run.spec.model.base, dtype=torch.float32
    )
    extend_embeddings(whole, new_tokens)
    ids = [t.id for t in new_tokens]
    weights = [whole.get_input_embeddings().weight, whole.get_output_embeddings().weight]
    expected = [w[ids] for w in weights] + [w[:100] for w in weights]
    for got, want in zip(partitioned, expected, strict=True):
        assert torch.equal(got, want.detach())
    whole.config.use_cache = False
    text = torch.tensor([list(range(1, 40)) + ids])
    with torch.no_grad():
        logits = whole(input_ids=text).logits
    torch.testing.assert_close(torch.tensor(written["logits"]), logits)


def test_safetensors_reader_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from chatflow.train.model import SafetensorsReader

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "i64": torch.arange(4),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    with SafetensorsReader(tmp_path / "w.safetensors") as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for key, tensor in tensors.items():
            read = reader.read(key)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), key
    cut = (tmp_path / "w.safetensors").read_bytes()[:-8]
    (tmp_path / "cut.safetensors").write_bytes(cut)
    with SafetensorsReader(tmp_path / "cut.safetensors") as reader:
        last = max(reader.keys(), key=lambda k: reader.header[k]["data_offsets"][1])
        with pytest.raises(ValueError, match=f"{last} is cut short"):
            reader.read(last)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsReader(tmp_path / "short.safetensors")
    save_file({"fp8": torch.zeros(4, dtype=torch.float8_e4m3fn)}, tmp_path / "fp8.safetensors")
    with (
        SafetensorsReader(tmp_path / "fp8.safetensors") as reader,
        pytest.raises(ValueError, match="fp8 is F8_E4M3, which is not read here"),
    ):
        reader.read("fp8")


def test_saved_buffers_are_the_persistent_ones() -> None:
    import torch

    from chatflow.train.model import _saved_buffers

    class Norm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(3))
            self.register_buffer("cache", torch.ones(3), persistent=False)

    model = torch.nn.Sequential(Norm())
    model.register_buffer("top", torch.zeros(1))
    assert sorted(_saved_buffers(model)) == ["0.scale", "top"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {
                "data": {
                    "sources": [
                        {
                            "name": "en-web",
                            "kind": "pretrain",
                            "language": "en",
                            "path": "no-such-org/no-such-corpus",
                        }
                    ]
                },
                "schedule": {"start": {"en-web": 1}, "end": {"en-web": 1}},
            },
            "chatflow: error: spec.data.sources[0].path: cannot load 'no-such-org/no-such-corpus'",
        ),
        (
            {"training": TRAINING | {"deepspeed": {"zero_optimization": {"stage3_bogus": 1}}}},
            "chatflow: error: spec.training.deepspeed: stage3_bogus: Extra inputs are not",
        ),
        ({"output": "not-a-directory"}, "chatflow: error: --output: cannot write to"),
    ],
    ids=["unreachable dataset", "bad deepspeed option", "unwritable output"],
)
def test_bad_input_fails_in_one_line_and_keeps_checkpoints(
    change, expected, reference, tiny_example, tmp_path, cache_dir
) -> None:
    output = tmp_path / "out"
    shutil.copytree(reference[0] / "checkpoints", output / "checkpoints")
    # Complete checkpoints; what an interrupted save left in .incomplete/ may be cleared.
    before = {
        p: p.read_bytes() for p in (output / "checkpoints").glob("step-*/**/*") if p.is_file()
    }
    if change.pop("output", None):
        (tmp_path / "file").write_text("")
        output = tmp_path / "file" / "out"
    spec = {"training": TRAINING, "schedule": SCHEDULE} | change
    manifest = tiny_manifest(tiny_example, tmp_path / "bad.yaml", **spec)
    result = subprocess.run(
        [
            CHATFLOW,
            "train",
            "-f",
            str(manifest),
            "--output",
            str(output),
            "--cache-dir",
            str(cache_dir),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("chatflow:")]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    checkpoints = tmp_path / "out" / "checkpoints"
    after = {p: p.read_bytes() for p in checkpoints.glob("step-*/**/*") if p.is_file()}
    assert after == before


def test_runs_from_the_environment_a_pytorchjob_pod_gets(manifests, tmp_path, cache_dir) -> None:
    """What a Kubeflow PyTorchJob's container does (the operator's command): torchrun, configured
    by PET_* variables.

    RANK is the operator's node rank there; torchrun replaces it with each process's global rank.
    """
    environment = _env() | {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "2",
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    manifest = manifests("pod", maxSteps=4)
    command = [sys.executable, "-m", "chatflow.train.torchrun", "-m", "chatflow.train"]
    command += ["--file", str(manifest), "--output", str(tmp_path / "out")]
    command += ["--cache-dir", str(cache_dir), "--log-samples"]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted((tmp_path / "out" / "samples").glob("rank-*.jsonl"))[-1].name == "rank-1.jsonl"
    assert samples(tmp_path / "out")[4] == list(range(24, 32))
    assert (tmp_path / "out" / "model" / "config.json").exists()


@pytest.mark.parametrize("stopped", [True, False])
def test_pod_torchrun_exits_retryable_when_a_worker_stopped_to_resume(
    tmp_path: Path, stopped: bool
) -> None:
    """torchrun exits 1 whether a worker failed or stopped to be resumed; the pods' wrapper tells
    the two apart for the PyTorchJob's ExitCode policy."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys\n"
        "from chatflow.train.torchrun import PREEMPTED, mark_preempted\n"
        f"if {stopped}:\n    mark_preempted()\n    sys.exit(PREEMPTED)\n"
        "sys.exit(3)\n"
    )
    command = [sys.executable, "-m", "chatflow.train.torchrun", "--standalone"]
    result = subprocess.run([*command, "--nproc-per-node=1", str(worker)], env=_env(), check=False)
    assert result.returncode == (128 + signal.SIGTERM if stopped else 1)


def test_attention_auto_is_sdpa_without_flash_attn_and_a_missing_package_is_one_line(
    manifests,
) -> None:
    from chatflow.spec import SpecError, load_run
    from chatflow.train import model
    from chatflow.train.deepspeed_config import deepspeed_config

    assert model.attention("auto", on_gpu=False) == "sdpa"
    assert model.attention("eager", on_gpu=True) == "eager"
    manifest = manifests("flash", attention="flash_attention_2")
    run = load_run(manifest)
    config = deepspeed_config(run.spec.training, 1, "fp32")
    with pytest.raises(SpecError, match=r"^spec\.training\.attention: flash_attention_2 needs"):
        model.load_model(run, manifest.parent, [], config)
