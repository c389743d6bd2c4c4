"""Progress reporting for long jobs: a terminal bar for people, JSON lines for the Slicer module.

In ``jsonl`` mode every report is one JSON object on its own line of stdout, flushed at once,
so a parent process can read progress while the job runs. Every object has ``stage``;
counting reports add ``done``, ``total`` and ``eta`` (seconds, or null while unknown) and
whatever fields the job adds (``loss``, ``dice``, ...). A job ends with a ``{"stage": "done"}``
object, or ``{"stage": "error", "message": ...}`` / ``{"stage": "cancelled"}``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PROGRESS_MODES = ("bar", "jsonl", "none")


class Progress:
    """Reports stages and counts of a long job in the chosen ``mode`` (bar, jsonl or none)."""

    def __init__(self, mode: str = "bar", stream: TextIO | None = None) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode {mode!r}; expected one of {', '.join(PROGRESS_MODES)}")
        self.mode = mode
        self._stream = stream
        self._bar = None
        self._stage = ""
        self._total: int | None = None
        self._started = time.monotonic()
        self._done_at_start = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _emit(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, default=_json_default) + "\n")
        self.stream.flush()

    def stage(self, name: str, total: int | None = None, done: int = 0) -> None:
        """Begin a stage; ``total`` is the count that :meth:`update` moves towards.

        ``done``: units already finished before this run (a resumed job); the estimated time
        left comes from the units done since.
        """
        self._close_bar()
        self._stage, self._total, self._started = name, total, time.monotonic()
        self._done_at_start = done
        if self.mode == "jsonl":
            self._emit({"stage": name, "done": done, "total": total, "eta": None})
        elif self.mode == "bar" and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=name, file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int, **fields: Any) -> None:
        """Report that ``done`` units of the current stage are finished."""
        eta = None
        if self._total and done > self._done_at_start:
            rate = (time.monotonic() - self._started) / (done - self._done_at_start)
            eta = rate * max(self._total - done, 0)
        if self.mode == "jsonl":
            self._emit({"stage": self._stage, "done": done, "total": self._total, "eta": eta, **fields})
        elif self._bar is not None:
            # Fields first, so the redraw that update() triggers shows them for this count.
            if fields:
                self._bar.set_postfix({k: _short(v) for k, v in fields.items()}, refresh=False)
            self._bar.update(done - self._bar.n)

    def message(self, text: str, **fields: Any) -> None:
        """A line of information (a case skipped, a file written)."""
        if self.mode == "jsonl":
            self._emit({"stage": self._stage, "message": text, **fields})
        elif self.mode == "bar":
            if self._bar is not None:
                self._bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def replay(self, record: dict[str, Any]) -> None:
        """Report a record another process made (a server's job): as it is in jsonl mode, else on the bar."""
        if self.mode == "jsonl":
            self._emit(record)
            return
        if "message" in record:
            self.message(str(record["message"]))
        elif "done" in record:
            if record.get("stage") != self._stage:
                self.stage(str(record.get("stage")), record.get("total"), int(record.get("done") or 0))
            else:
                extra = {k: v for k, v in record.items() if k not in ("stage", "done", "total", "eta")}
                self.update(int(record.get("done") or 0), **extra)

    def finish(self, stage: str = "done", **fields: Any) -> None:
        """Close the current bar and, in jsonl mode, report the final ``stage``."""
        self._close_bar()
        if self.mode == "jsonl":
            self._emit({"stage": stage, **fields})

    @contextmanager
    def reporting_outcome(self) -> Iterator["Progress"]:
        """Report a job that ends early: ``cancelled`` on Ctrl-C/SIGTERM, ``error`` with its message."""
        try:
            yield self
        except KeyboardInterrupt:
            self.finish("cancelled")
            raise
        except Exception as error:
            self.finish("error", message=str(error))
            raise

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cancel_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so a killed job unwinds like Ctrl-C.

    Unwinding runs every ``finally``: temporary files go and no partial output is left.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
