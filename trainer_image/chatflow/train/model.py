"""The model: loaded from `spec.model.base` with its vocabulary extended, wrapped in a DeepSpeed
engine, and saved at the end in Hugging Face format."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from chatflow.data.pipeline import from_pretrained, load_model_config
from chatflow.spec import ChatFlowRun, SpecError, TrainingSpec
from chatflow.train import distributed
from chatflow.train.deepspeed_config import deepspeed_problem
from chatflow.train.lr import lr_at

T = TypeVar("T")


def load_model(run: ChatFlowRun, base_dir: Path, new_tokens: list, config: dict[str, Any]) -> Any:
    """The base model with the run's new embedding rows, ready for `engine(config)`.

    Under ZeRO-3 no rank holds the whole model, which for 7B in fp32 on 8 ranks of a node would
    be 224 GB of host memory before training starts (`_load_partitioned`).
    """
    from transformers import AutoModelForCausalLM

    from chatflow.vocab import extend_embeddings

    load_model_config(run.spec, base_dir)  # refuses a seqLength past the model's positions
    global _zero3_config
    _zero3_config = None
    if config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _zero3_config = _checked(lambda: HfDeepSpeedConfig(config))
    kernel = attention(run.spec.training.attention, torch.cuda.is_available())
    if kernel == "flash_attention_2" and not _has_flash_attn():
        raise SpecError(
            "spec.training.attention: flash_attention_2 needs the flash-attn package, which this "
            "image does not have (use sdpa or auto)"
        )

    def load(path: str) -> Any:
        if _zero3_config is not None:
            return _load_partitioned(path, kernel)
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=kernel
        )

    model = from_pretrained(load, run.spec.model.base, base_dir, "spec.model.base", "model")
    if new_tokens:
        extend_embeddings(model, new_tokens)  # under ZeRO-3 on every rank, collectively
        if _zero3_config is not None:
            import deepspeed

            # transformers builds the resized embedding matrices whole on every rank (the same
            # values everywhere); partition them now rather than at deepspeed.initialize.
            deepspeed.zero.Init(module=model, config_dict_or_path=config)
    model.config.use_cache = False  # no generation during training
    if run.spec.training.activation_checkpointing:
        model.activation_checkpointing_enable()
    return model


def _load_partitioned(path: str, kernel: str) -> Any:
    """The model built partitioned and its checkpoint streamed in, a tensor at a time.

    transformers builds the model inside DeepSpeed's `zero.Init` (the `HfDeepSpeedConfig` set
    above), so each parameter is partitioned over the ranks as it is created, without the random
    initialisation the checkpoint would overwrite. Then every rank walks the safetensors files'
    keys in the same order, gathering one parameter at a time, and rank 0 reads that tensor from
    the file into it. Rank 0 thus holds its partition and one whole parameter, never the model:
    transformers' own ZeRO-3 loading reads every file whole into rank 0's memory first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {directory} (ZeRO-3 loads only those)")
    with _freed_memory_returned(), _random_init_skipped():
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(directory), dtype=torch.float32, attn_implementation=kernel
        )
        _stream_weights(model, files, directory)
    return model


@contextlib.contextmanager
def _random_init_skipped() -> Iterator[None]:
    """transformers' ZeRO-3 construction off its random initialisation of every weight, which
    gathers each module onto rank 0 to fill it: 27 of the 33 s a 0.55B model took to load on 2
    CPU ranks, for values `_stream_weights` then overwrites (it refuses a checkpoint that leaves
    any parameter unwritten). The buffers (rotary frequencies) are computed as the model is built.
    """
    from unittest import mock

    from transformers.integrations import deepspeed as hf_deepspeed

    # patch.object fails loudly if a transformers release renames the function.
    with mock.patch.object(hf_deepspeed, "initialize_weights_zero3", lambda model: None):
        yield


def _stream_weights(model: Any, files: list[Path], directory: Path) -> None:
    """Each parameter of the partitioned `model` gathered in turn and written by rank 0; the
    buffers the checkpoint holds (not partitioned) read by every rank."""
    import deepspeed

    parameters = dict(model.named_parameters())
    buffers = _saved_buffers(model)
    missing = set(parameters) | set(buffers)
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for file in files:
            with SafetensorsReader(file) as weights:
                # Every rank in the same order: each gather is a collective.
                for key in sorted(weights.keys()):
                    if key in buffers:
                        _copy(buffers[key], weights.read(key), file, key)
                    elif key in parameters:
                        parameter = parameters[key]
                        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                            if rank == 0:
                                _copy(parameter, weights.read(key), file, key)
                    missing.discard(key)
    if missing:
        raise ValueError(f"{directory} has no weights for {sorted(missing)[0]}")


def _saved_buffers(model: Any) -> dict[str, torch.Tensor]:
    """The buffers a checkpoint holds (rotary frequencies, computed as the model is built, are
    not saved)."""
    return {
        f"{module_name}.{name}" if module_name else name: buffer
        for module_name, module in model.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set
    }


def _copy(target: torch.Tensor, tensor: torch.Tensor, file: Path, key: str) -> None:
    if tensor.shape != target.shape:  # copy_ would broadcast
        raise ValueError(
            f"{file}: {key} has shape {list(tensor.shape)}, the model {list(target.shape)}"
        )
    target.copy_(tensor)


class SafetensorsReader:
    """Tensors of a .safetensors file, each read on request into memory of its own.

    safetensors' `safe_open` maps the file, and every page read counts in the reader's resident
    memory (and a container's working set) until the file is closed: 10 GB on rank 0 for one
    file of LLaMA-2-7B. Read with `readinto`, the pages are page cache only.
    """

    DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
        "BOOL": torch.bool,
    }  # fmt: skip
    MAX_HEADER = 100_000_000  # safetensors' own limit

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("rb", buffering=0)
        try:
            head = self.file.read(8)
            size = int.from_bytes(head, "little")
            if len(head) < 8 or size > self.MAX_HEADER:
                raise ValueError(f"{path}: not a safetensors file (header size {size})")
            self.header = json.loads(self.file.read(size))
        except BaseException:
            self.file.close()
            raise
        self.header.pop("__metadata__", None)
        self.data_start = 8 + size

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.file.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def read(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in self.DTYPES:  # FP8 would need its scales applied too
            raise ValueError(f"{self.path}: {key} is {entry['dtype']}, which is not read here")
        tensor = torch.empty(entry["shape"], dtype=self.DTYPES[entry["dtype"]])
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        if end - begin != len(buffer):
            raise ValueError(f"{self.path}: the header's size for {key} is not its shape's")
        self.file.seek(self.data_start + begin)
        done = 0
        while done < len(buffer):  # one read returns at most 2 GiB on Linux
            count = self.file.readinto(buffer[done:])
            if not count:
                raise ValueError(f"{self.path}: {key} is cut short")
            done += count
        return tensor


# glibc's mallopt parameter, and the ceiling of its own dynamic threshold (64-bit).
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


@contextlib.contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """Inside the block, every allocation of 64 KiB or more is its own mapping, so freeing it
    gives it back to the system.

    On CPU, zero.Init creates each parameter whole, keeps this rank's partition and frees the
    rest. glibc serves blocks under its mmap threshold (up to 32 MiB) from its heap, where the
    freed wholes lie fragmented between the kept partitions: measured with a 0.55B model on 2
    ranks, each rank ended holding 2.9 GB instead of 1.5. (On GPUs the parameters are created in
    device memory, and this does not arise.) After the block, the threshold stays at glibc's
    ceiling rather than moving, a difference large tensors do not notice.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):  # not glibc (musl, macOS)
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


def attention(choice: str, on_gpu: bool) -> str:
    """The attention implementation transformers is asked for: `choice`, or for `auto` the
    fastest one here. flash_attention_2 runs only on GPUs; PyTorch's SDPA picks its own flash or
    memory-efficient kernel there, and is the fastest exact kernel on CPU."""
    if choice != "auto":
        return choice
    return "flash_attention_2" if on_gpu and _has_flash_attn() else "sdpa"


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# transformers finds the ZeRO-3 config through a weak reference, which must stay alive while the
# model is built and resized (and, its docs say, for the process's life).
_zero3_config: Any = None


def engine(model: Any, config: dict[str, Any], training: TrainingSpec) -> Any:
    """The DeepSpeed engine around `model`, with the run's learning-rate schedule."""
    import deepspeed

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        peak = training.optimizer.lr
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, training.optimizer, training.total_steps) / peak
        )

    wrapped, *_ = _checked(
        lambda: deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config, lr_scheduler=schedule
        )
    )
    if training.compile:
        wrapped.compile()  # DeepSpeed's own: compiles the module inside its hooks
    return wrapped


def _checked(make: Callable[[], T]) -> T:
    """`make()`, which validates the DeepSpeed config: a problem is one line naming the option."""
    try:
        return make()
    except Exception as e:
        raise SpecError(f"spec.training.deepspeed: {deepspeed_problem(e)}") from None


def save_model(
    engine: Any, tokenizer: Any, target: Path, place: distributed.Place, zero_stage: int
) -> None:
    """The final model in Hugging Face format: save_pretrained, loadable with from_pretrained."""
    # Under ZeRO-3 the weights are sharded: every rank takes part in gathering them.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if place.is_main:
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        engine.module.save_pretrained(staging, state_dict=state)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    distributed.barrier()
