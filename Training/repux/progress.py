"""Progress reporting for long jobs: a terminal bar for people, JSON lines for the Slicer module.

In ``jsonl`` mode every report is one JSON object on its own line of stdout, flushed at once,
so a parent process can read progress while the job runs. Every object has ``stage``;
counting reports add ``done``, ``total`` and ``eta`` (seconds, or null while unknown) and
whatever fields the job adds (``loss``, ``dice``, ...). A job ends with a ``{"stage": "done"}``
object, or ``{"stage": "error", "message": ...}`` / ``{"stage": "cancelled"}``. Warnings
(a scan unlike the model's training data) are ``{"stage": "warning", "message": ...}``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

PROGRESS_MODES = ("bar", "jsonl", "none")
#: The one help text of ``--progress`` in every command.
PROGRESS_HELP = "bar (terminal bar on stderr, default), jsonl (one JSON object per line on stdout) or none"


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
        self.stream.write(json.dumps(_json_safe(record), default=_json_default, allow_nan=False) + "\n")
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

    def warning(self, text: str, **fields: Any) -> None:
        """Something the user must see even without a progress display (a scan unlike the
        training data): ``warning: TEXT`` on stderr, or a ``{"stage": "warning"}`` record."""
        if self.mode == "jsonl":
            self._emit({"stage": "warning", "message": text, **fields})
        elif self._bar is not None:
            self._bar.write(f"warning: {text}", file=sys.stderr)
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def replay(self, record: dict[str, Any]) -> None:
        """Report a record another process made (a server's job): as it is in jsonl mode, else on the bar."""
        if self.mode == "jsonl":
            self._emit(record)
            return
        if record.get("stage") == "warning" and "message" in record:
            self.warning(str(record["message"]))
        elif "message" in record:
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


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite number (NaN, inf; also numpy/torch scalars) as None: JSON has
    no NaN, and a reader such as the Slicer module must be able to parse every record."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    return str(value)


def run_cancellable(work: Callable[[], T], poll_s: float = 0.1) -> T:
    """``work()``, run in a helper thread while this thread waits, so that Ctrl-C and SIGTERM act
    within ``poll_s`` even while ``work`` is inside one long C call.

    Python handles signals in the main thread between its own steps: a compressed ITK write
    of a large volume (one C call) would hold a cancel off for tens of seconds. ITK and zlib
    release the GIL while they work, so the waiting thread gets the signal at once. On a
    cancel the helper thread is abandoned (a daemon: it ends with the process) and the
    caller's cleanup (the atomic writers' temporary files) runs as usual.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = error

    if threading.current_thread() is not threading.main_thread():
        return work()  # no signals to wait for outside the main thread
    helper = threading.Thread(target=target, name="repux-cancellable", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(poll_s)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


#: The signal that cancelled this process (SIGTERM), or None: Ctrl-C or not cancelled.
_cancel_signal: int | None = None


def _raise_interrupt(signum: int, _frame: Any) -> None:
    global _cancel_signal
    _cancel_signal = signum
    raise KeyboardInterrupt(f"signal {signum}")


def cancel_exit_code() -> int:
    """The shell's exit status of a process ended by its cancelling signal: 128 + signal
    number (143 for SIGTERM, 130 for Ctrl-C)."""
    return 128 + int(_cancel_signal if _cancel_signal is not None else signal.SIGINT)


def cancel_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so a killed job unwinds like Ctrl-C.

    Unwinding runs every ``finally``: temporary files go and no partial output is left.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
