"""Atomic writes: a reader never sees half a file or half a folder.

Everything is written under a temporary name in the destination's own folder (same file
system, so the final ``os.replace`` is atomic) and renamed only when complete. An error,
Ctrl-C or SIGTERM in between leaves the temporary removed and the destination untouched.

Temporary names are ``.STEM.tmp-PID-XXXXXXXX.ENDING`` (PID: the writing process; a STEM too
long for the file system's 255-byte names is shortened, see :func:`_temp_stem`). A run
killed outright (``kill -9``, a power cut) cannot remove its temporary; the next write of
the same destination removes it once its process is gone (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: A temporary of a dead process is removed only once it is this old (s): a live process
#: writing on another machine (a shared folder) keeps its file's time fresh.
STALE_AFTER_S = 60.0


def _split_name(name: str) -> tuple[str, str]:
    # Keep the full ending (".nii.gz", ".seg.nrrd") so writers that pick a format by name still do.
    stem, dot, rest = name.partition(".")
    return stem, dot + rest


#: The longest file name (bytes) that common file systems take (ext4, XFS, APFS; NTFS: 255 UTF-16 units).
NAME_MAX = 255
#: What a temporary adds to the stem: the dot, ".tmp-", a PID of up to 10 digits, "-", 8 hex digits.
_TEMP_EXTRA = len(".") + len(".tmp-") + 10 + len("-") + 8


def _temp_stem(stem: str, ending: str) -> str:
    """``stem``, or when its temporary's name would exceed :data:`NAME_MAX`, a prefix of it plus a
    hash of the whole (so a destination whose own name fits can always be written atomically,
    and two long names never share their temporaries)."""
    budget = NAME_MAX - _TEMP_EXTRA - len(ending.encode("utf-8"))
    if len(stem.encode("utf-8")) <= budget:
        return stem
    digest = hashlib.sha256(stem.encode("utf-8")).hexdigest()[:12]
    prefix = stem.encode("utf-8")[: max(budget - len(digest) - 1, 0)].decode("utf-8", "ignore")
    return f"{prefix}~{digest}"


def _temp_sibling(path: Path) -> Path:
    stem, ending = _split_name(path.name)
    return path.with_name(f".{_temp_stem(stem, ending)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ending}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this one included; another user's counts as running)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # type: ignore[attr-defined]
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))  # type: ignore[attr-defined]
        ctypes.windll.kernel32.CloseHandle(handle)  # type: ignore[attr-defined]
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left beside it; return them.

    Only this module's own names for ``path`` (``.STEM.tmp-PID-XXXXXXXX.ENDING``) whose
    process no longer runs and that are at least :data:`STALE_AFTER_S` old: never a user's
    file, nor the temporary of a write in progress.
    """
    path = Path(path)
    stem, ending = _split_name(path.name)
    pattern = re.compile(rf"\.{re.escape(_temp_stem(stem, ending))}\.tmp-(\d+)-[0-9a-f]{{8}}{re.escape(ending)}")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        try:
            if time.time() - sibling.lstat().st_mtime < STALE_AFTER_S:
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        removed.append(sibling)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (checked before and after).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: appeared while it was being written; refusing to overwrite it")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` as a whole.

    An existing folder is replaced only with ``overwrite``; it is moved aside first and
    removed after the new one is in place, so some complete version always exists.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; refusing to overwrite it (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path}: appeared while it was being written; refusing to overwrite it")
            old = _temp_sibling(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def refuse_replacing_working_folder(path: str | os.PathLike) -> Path:
    """``path`` resolved; refused when it is the current folder or a folder above it.

    Replacing a folder moves it aside and deletes it: the process (and the user's shell)
    would be left standing in a deleted folder.

    Raises:
        FileExistsError: naming the folder and why.
    """
    resolved = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(
            f"{path}: is the current folder or holds it ({resolved}); refusing to replace it, even with --force"
        )
    return resolved


def write_json(data: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)
