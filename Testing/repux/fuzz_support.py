"""Fuzz targets over every reader of user input (no tests here): the short CI run is
``test_fuzz_inputs.py``, the long one ``benchmarks/fuzz_inputs.py``.

Each target takes bytes or JSON drawn by hypothesis, writes them where the reader expects
a file, runs the reader and demands one of two outcomes: success, or the project's own
``InputError`` (whose message the command line prints). Anything else is a finding: another
exception (a traceback for the user), more than :data:`TIME_LIMIT_S` seconds (a hang), or a
file created outside the input (a reader must write nothing).

Targets:
- volume readers: NIfTI-1 (``.nii``, ``.nii.gz``), NRRD, MetaImage: mutated header bytes,
  mutated header fields, truncated bodies;
- the bundle loader: mutated ``model.json`` values and ``model.safetensors`` headers;
- ``dataset.json`` of a training set and a labels JSON (the training manifests);
- the Slicer runner's ``--progress jsonl`` line handling (``RepuxJob._handle_line``, then
  what the module shows: ``fraction`` and ``describe_progress``).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from repux.errors import InputError
from repux.imageio import Volume, read_volume, write_volume

#: Seconds one input may take before it counts as a hang.
TIME_LIMIT_S = 10.0
#: Values that break parsers more often than random ones.
INTERESTING_TEXT = [
    "0", "-1", "-0", "1e308", "-1e308", "nan", "inf", "-inf", "99999999999", "4294967297", "", " ", "abc", "1 2",
    "1 2 3 4", "0 0 0", "LOCAL", "../x", "/dev/zero", "\x00", "1e-320", "3.5", "(1,0,0) (0,1,0) (0,0,1)", "none",
]  # fmt: skip
INTERESTING_NUMBERS = [0, -1, 1, 2, 3, 7, 8, 255, 256, 348, 540, 32767, -32768, 65535, 2**31 - 1, -(2**31), 2**63 - 1]

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.sampled_from(INTERESTING_NUMBERS)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.sampled_from(INTERESTING_TEXT),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=12,
)  # fmt: skip


class Hang(BaseException):
    """An input took longer than the time limit (BaseException: no reader may swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds``."""

    def expire(_signum: int, _frame: Any) -> None:
        raise Hang(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


#: Outcomes counted over a run (for the long run's report): "ok", "refused", "finding".
COUNTS: dict[str, int] = {"ok": 0, "refused": 0, "finding": 0}
#: The first line of every distinct finding, with the number of inputs that gave it.
FINDINGS: dict[str, int] = {}


def _finding(text: str) -> AssertionError:
    COUNTS["finding"] += 1
    # One entry per kind of finding: the quoted values and numbers of each input left out.
    first = re.sub(r"'[^']*'|\d+", "_", text.splitlines()[0])[:300] if text else "?"
    FINDINGS[first] = FINDINGS.get(first, 0) + 1
    return AssertionError(text)


def outcome(work: Callable[[], Any], folder: Path) -> str:
    """Run ``work`` on inputs in ``folder``: "ok" or "refused"; AssertionError for a finding."""
    before = _tree(folder)
    try:
        with time_limit():
            work()
        result = "ok"
    except InputError:
        result = "refused"
    except Hang as error:
        raise _finding(f"hang: {error}") from None
    except Exception as error:  # noqa: BLE001 - that is the finding
        raise _finding(f"{type(error).__name__} instead of InputError: {error}") from error
    created = _tree(folder) - before
    if created:
        raise _finding(f"files written by a reader: {sorted(created)}")
    COUNTS[result] += 1
    return result


# -- volume files ------------------------------------------------------------------------

#: Seed files: a small int16 and a small float32 volume in every format.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


def seed_volumes(folder: Path) -> dict[str, bytes]:
    """``{name: bytes}`` of valid small volumes, one per format and voxel type (for .nii.gz:
    the uncompressed bytes, compressed again when written)."""
    rng = np.random.default_rng(0)
    seeds = {}
    for dtype in (np.int16, np.float32):
        array = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(dtype)
        volume = Volume(array, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0))
        for suffix in VOLUME_SUFFIXES:
            path = write_volume(volume, folder / f"seed-{np.dtype(dtype).name}{suffix}", overwrite=True)
            data = path.read_bytes()
            seeds[path.name] = gzip.decompress(data) if suffix == ".nii.gz" else data
            path.unlink()
    return seeds


def header_length(name: str, data: bytes) -> int:
    """Bytes of ``data`` before the voxels: 352 for NIfTI-1, the text header otherwise."""
    if name.endswith((".nii", ".nii.gz")):
        return 352
    end = data.find(b"\n\n") if name.endswith(".nrrd") else data.find(b"ElementDataFile = LOCAL\n")
    return (end + 2 if name.endswith(".nrrd") else end + len(b"ElementDataFile = LOCAL\n")) if end >= 0 else len(data)


def mutate_bytes(data: bytes, header: int, flips: list[tuple[int, int]], truncate: int | None) -> bytes:
    """``data`` with bytes (offset within the header, value) replaced, then cut to ``truncate`` bytes."""
    out = bytearray(data)
    for offset, value in flips:
        out[offset % max(header, 1)] = value
    return bytes(out[:truncate] if truncate is not None else out)


def mutate_field(data: bytes, header: int, line: int, value: str) -> bytes:
    """A text header with the value of its ``line``-th field replaced by ``value``."""
    lines = data[:header].split(b"\n")
    fields = [i for i, text in enumerate(lines) if b":" in text or b"=" in text]
    if not fields:
        return data
    index = fields[line % len(fields)]
    separator = b": " if b": " in lines[index] else b" = "
    key = lines[index].split(separator)[0]
    lines[index] = key + separator + value.encode("utf-8", "replace")
    return b"\n".join(lines) + data[header:]


def write_input(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as the file the reader gets (gzip-compressed for .nii.gz)."""
    path = folder / name
    path.write_bytes(gzip.compress(data) if name.endswith(".nii.gz") else data)
    return path


def read_checked(path: Path) -> None:
    """What ``repux segment`` does with an input: read it, then check its voxels."""
    from repux.infer.preprocess import check_image

    check_image(read_volume(path), str(path))


# -- bundles -------------------------------------------------------------------------------


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a parsed JSON value (the root included)."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += json_paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += json_paths(child, prefix + (index,))
    return paths


def replace_at(value: Any, path: tuple, new: Any, delete: bool = False) -> Any:
    """A copy of ``value`` with the item at ``path`` replaced by ``new`` (or deleted)."""
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return copy


def write_bundle(folder: Path, model_json: str, weights: bytes) -> Path:
    """A bundle folder with the given ``model.json`` text and ``model.safetensors`` bytes."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(model_json, encoding="utf-8")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def mutate_safetensors(data: bytes, length: int | None, flips: list[tuple[int, int]], truncate: int | None) -> bytes:
    """Safetensors bytes with the 8-byte header length replaced, header bytes flipped, or cut short."""
    out = bytearray(data)
    header = struct.unpack("<Q", data[:8])[0]
    if length is not None:
        out[:8] = struct.pack("<Q", length % 2**64)
    for offset, value in flips:
        out[8 + offset % header] = value
    return bytes(out[:truncate] if truncate is not None else out)


# -- the Slicer runner -----------------------------------------------------------------------


PROGRESS_KEYS = ["stage", "done", "total", "eta", "message", "loss", "dice", "iteration", "case"]
RECORDS = st.dictionaries(st.sampled_from(PROGRESS_KEYS) | st.text(max_size=8), JSON_VALUES, max_size=6)
#: Up to 6 ``(stream, line)`` pairs: progress records of any content, text, broken and deeply nested JSON.
PROGRESS_LINES = st.lists(
    st.tuples(
        st.sampled_from(["out", "err"]),
        RECORDS.map(json.dumps) | st.text(max_size=60) | st.text(max_size=40).map(lambda t: "{" + t)
        | st.integers(1, 200_000).map(lambda n: '{"a": ' + "[" * n + "]" * n + "}"),
    ),
    max_size=6,
)  # fmt: skip


def runner_module():
    """``RepUXSegmentLib.runner`` (torch-free, as the GUI process imports it)."""
    module_dir = Path(__file__).resolve().parents[2] / "RepUXSegment"
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))
    from RepUXSegmentLib import runner

    return runner


def handle_lines(job: Any, lines: list[tuple[str, str]]) -> None:
    """Feed ``(stream, line)`` pairs to a job as its reader threads would, then read what the
    module shows (the progress fraction and the progress line of the latest record)."""
    runner = runner_module()
    for name, line in lines:
        job._handle_line(name, line)
        job.fraction  # noqa: B018 - the property the progress bar reads
        if job.latest is not None:
            runner.describe_progress(job.latest)
