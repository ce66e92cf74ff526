from __future__ import annotations

import io
import json
from datetime import datetime

import pytest

from chatflow.train.progress import Progress

SOURCES = ["en-web", "zh-web"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_pod_logs_get_one_json_object_per_line() -> None:
    stream = io.StringIO()
    progress = Progress(total_steps=60, sources=SOURCES, stream=stream)
    progress.update(12, 192, 1234.56, loss=6.21, lr=3e-4, mixture=[0.625, 0.375], grad_norm=0.9)
    progress.message("checkpoint saved", step=12, path="/out/step-00000012")
    progress.update(13, 208, 1200.0, loss=float("nan"), lr=3e-4, mixture=[0.5, 0.5])
    progress.close()

    step, saved, diverged = (json.loads(line) for line in stream.getvalue().splitlines())
    assert datetime.fromisoformat(step.pop("time")).tzinfo is not None
    assert step == {
        "event": "step",
        "step": 12,
        "samples": 192,
        "loss": 6.21,
        "lr": 3e-4,
        "tokens_per_second": 1234.6,
        "mixture": {"en-web": 0.625, "zh-web": 0.375},
        "grad_norm": 0.9,
    }
    assert saved.keys() == {"time", "event", "step", "path"}
    assert (saved["event"], saved["step"]) == ("checkpoint saved", 12)
    assert diverged["loss"] == "nan"


def test_a_terminal_gets_a_redrawn_bar_with_messages_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    stream = Terminal()
    progress = Progress(total_steps=60, sources=SOURCES, stream=stream)
    progress.update(12, 192, 1234.0, loss=6.21, lr=3e-4, mixture=[0.42, 0.58])
    progress.message("resumed", step=12)
    progress.close()

    before, bar, message = stream.getvalue().split("\r\x1b[K")
    assert before == ""
    assert bar == (
        "step 12/60 [####----------------] 20% | 192 samples | 1,234 tok/s | loss 6.21"
        " | lr 3.0e-04 | en-web .42 zh-web .58"
    )
    assert message == f"resumed step=12\n{bar}\n"


def test_the_bar_never_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    stream = Terminal()
    Progress(total_steps=60, sources=SOURCES, stream=stream).update(
        1, 16, 1000.0, loss=9.0, lr=1e-5, mixture=[0.5, 0.5]
    )
    assert len(stream.getvalue().removeprefix("\r\x1b[K")) < 40
