"""The terminal progress bar of a headless run: node, step/total, percent, loss, ETA.

Fed by ComfyUI's websocket "progress" messages (`value`, `max` per node). ETA is measured per
node from its first progress message: seconds so far / steps so far * steps left. On a terminal the
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
               width: int = 24) -> str:
    """`Train LoRA [######------] 100/200  50%  loss 0.1234  ETA 1:40`."""
    fraction = min(1.0, max(0.0, value / total)) if total > 0 else 0.0
    filled = int(round(fraction * width))
    bar = "#" * filled + "-" * (width - filled)
    eta_text = "-" if eta is None else format_duration(eta)
    return (f"{label} [{bar}] {value}/{total} {fraction * 100:3.0f}%  "
            f"loss {format_loss(loss)}  ETA {eta_text}")


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
        self._drawn = 0  # characters of the bar now on screen (tty only)

    def reset(self) -> None:
        """Forget rates and print times: a new run starts."""
        self._starts.clear()
        self._last_print = float("-inf")

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

    def update(self, label: str, value: int, total: int, loss: float | None) -> None:
        line = format_bar(label, value, total, loss, self.eta(label, value, total))
        if self.tty:
            self._draw(line)
        else:
            now = self.clock()
            if value < total and now - self._last_print < self.interval:
                return
            self._last_print = now
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
