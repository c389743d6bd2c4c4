"""Atomic writes: a reader never sees half a file or half a folder.

Everything is written under a temporary name in the destination's own folder (same file
system, so the final ``os.replace`` is atomic) and renamed only when complete. An error,
Ctrl-C or SIGTERM in between leaves the temporary removed and the destination untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temp_sibling(path: Path) -> Path:
    # Keep the full ending (".nii.gz", ".seg.nrrd") so writers that pick a format by name still do.
    name = path.name
    stem, dot, rest = name.partition(".")
    return path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{dot}{rest}")


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
