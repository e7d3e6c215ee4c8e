"""The terminal progress bar of a headless run: node, step/total, percent, loss, ETA.

Fed by Train LoRA's "lora_trainer.progress" event (step, total, loss, smoothed loss, lr, validation
loss and the server's ETA) and, for other nodes, ComfyUI's "progress" messages (`value`, `max`).
Without a server ETA it is measured per node from its first message: seconds so far / steps so
far * steps left. On a terminal the
line is redrawn in place; elsewhere (CI logs, pipes) a plain line is printed at most every
`interval` seconds and when a node reaches 100 %, so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    """`42` -> `0:42`, `3725` -> `1:02:05`."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"


def format_bar(label: str, value: int, total: int, loss: float | None, eta: float | None,
               width: int = 24, *, smoothed: float | None = None, validation: float | None = None,
               lr: float | None = None) -> str:
    """`Train LoRA [######------] 100/200  50%  loss 0.1234 (avg 0.1300)  val 0.1100  lr 1.00e-04  ETA 1:40`;
    the parts in between appear when known."""
    fraction = min(1.0, max(0.0, value / total)) if total > 0 else 0.0
    filled = int(round(fraction * width))
    bar = "#" * filled + "-" * (width - filled)
    eta_text = "-" if eta is None else format_duration(eta)
    avg = "" if smoothed is None else f" (avg {format_loss(smoothed)})"
    val = "" if validation is None else f"  val {format_loss(validation)}"
    rate = "" if lr is None else f"  lr {lr:.2e}"
    return (f"{label} [{bar}] {value}/{total} {fraction * 100:3.0f}%  "
            f"loss {format_loss(loss)}{avg}{val}{rate}  ETA {eta_text}")


class ProgressBar:
    """One progress line on `stream` (stderr by default); `note` prints a message above it."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 interval: float = 10.0, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.interval = interval
        self.tty = self.stream.isatty() if tty is None else tty
        self._starts: dict[str, tuple[float, int]] = {}  # label -> (time, value) of its first update
        self._last_print = float("-inf")
        self._last_line = ""  # the last line printed (not on a tty): an identical one is not repeated
        self._drawn = 0  # characters of the bar now on screen (tty only)

    def reset(self) -> None:
        """Forget rates and print times: a new run starts."""
        self._starts.clear()
        self._last_print = float("-inf")
        self._last_line = ""

    def eta(self, label: str, value: int, total: int) -> float | None:
        """Seconds left for `label`, from its rate since its first update; None until measurable."""
        now = self.clock()
        start_time, start_value = self._starts.setdefault(label, (now, value))
        done = value - start_value
        if done <= 0 or now <= start_time:
            return None
        return (now - start_time) / done * max(0, total - value)

    def status(self, text: str) -> None:
        """A passing state ("Load Checkpoint ..."), on a terminal only: logs stay short."""
        if self.tty:
            self._draw(text)
            self.stream.flush()

    def _draw(self, line: str) -> None:
        pad = " " * max(0, self._drawn - len(line))
        self.stream.write("\r" + line + pad)
        self._drawn = len(line)

    def update(self, label: str, value: int, total: int, loss: float | None, *, smoothed: float | None = None,
               validation: float | None = None, lr: float | None = None, eta: float | None = None) -> None:
        """Show `value`/`total` of `label`; `eta` is the sender's (else measured here)."""
        measured = self.eta(label, value, total)
        line = format_bar(label, value, total, loss, measured if eta is None else eta,
                          smoothed=smoothed, validation=validation, lr=lr)
        if self.tty:
            self._draw(line)
        else:
            now = self.clock()
            if line == self._last_line or value < total and now - self._last_print < self.interval:
                return
            self._last_print, self._last_line = now, line
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message on its own line (the bar, if drawn, is ended first)."""
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line so later output starts on a fresh one."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = 0
