"""Training progress for people: a live bar on a terminal, JSON lines in pod logs.

On a terminal one line is redrawn in place and events print above it. Anywhere else (`kubectl
logs`, a log collector) every update is one JSON object per line, flushed at once so a killed pod
loses nothing, and parseable without knowing the bar's layout.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

BAR_WIDTH = 20
CLEAR_LINE = "\r\x1b[K"


class Progress:
    """Reports steps and events of one run to `stream` (rank 0 only)."""

    def __init__(
        self, total_steps: int, sources: Sequence[str], stream: TextIO = sys.stderr
    ) -> None:
        self.total_steps = total_steps
        self.sources = list(sources)
        self.stream = stream
        self.tty = stream.isatty()
        self._bar = ""  # the line currently drawn, redrawn after a message

    def update(
        self,
        step: int,
        samples: int,
        tokens_per_second: float,
        loss: float,
        lr: float,
        mixture: Sequence[float],
        **extra: Any,
    ) -> None:
        """Report optimizer step `step` of `total_steps`; `mixture` is each source's fraction."""
        if not self.tty:
            self._write_json(
                event="step",
                step=step,
                samples=samples,
                loss=loss,
                lr=lr,
                tokens_per_second=round(tokens_per_second, 1),
                mixture={s: round(f, 4) for s, f in zip(self.sources, mixture, strict=True)},
                **extra,
            )
            return
        done = min(step / self.total_steps, 1.0)
        filled = round(done * BAR_WIDTH)
        parts = [
            f"step {step}/{self.total_steps} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] "
            f"{done:.0%}",
            f"{samples:,} samples",
            f"{tokens_per_second:,.0f} tok/s",
            f"loss {loss:.2f}",
            f"lr {lr:.1e}",
            " ".join(f"{s} {_fraction(f)}" for s, f in zip(self.sources, mixture, strict=True)),
            *(f"{key} {value}" for key, value in extra.items()),
        ]
        # A line longer than the terminal wraps, and `\r` then redraws only its last row.
        width = shutil.get_terminal_size().columns - 1
        self._bar = " | ".join(parts)[:width]
        self.stream.write(CLEAR_LINE + self._bar)
        self.stream.flush()

    def message(self, text: str, **fields: Any) -> None:
        """Report an event (checkpoint saved, resumed, evaluation results) on its own line.

        Field values that JSON cannot hold (paths, say) are written as their `str()`.
        """
        if not self.tty:
            self._write_json(event=text, **fields)
            return
        details = " ".join(f"{key}={value}" for key, value in fields.items())
        self.stream.write(f"{CLEAR_LINE}{text} {details}".rstrip() + "\n" + self._bar)
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line so whatever prints next starts on a fresh one."""
        if self.tty and self._bar:
            self.stream.write("\n")
            self.stream.flush()
            self._bar = ""

    def _write_json(self, **record: Any) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
        line = json.dumps({key: _json_safe(value) for key, value in record.items()}, default=str)
        self.stream.write(line + "\n")
        self.stream.flush()


def _json_safe(value: Any) -> Any:
    """NaN and infinity (a diverging loss) as text: they are not JSON, and parsers drop the line."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _fraction(value: float) -> str:
    """`.42` rather than `0.42`: the mixture has one per source, so the bar stays short."""
    text = f"{value:.2f}"
    return text[1:] if text.startswith("0") else text
