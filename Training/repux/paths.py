"""Output paths checked before any work starts: never an input, never two outputs on one file,
always somewhere a file can be written.

The commands call these before they import torch or read an image, so a mistyped output
fails in a fraction of a second instead of after the whole inference.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from repux.atomic import NAME_MAX
from repux.errors import InputError


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """True when both paths name one file: after resolving '..' and links, or the same inode."""
    first, second = Path(first), Path(second)
    try:
        if first.exists() and second.exists():
            return os.path.samefile(first, second)
    except OSError:
        pass
    return first.resolve() == second.resolve()


def refuse_outputs_over_inputs(outputs: Mapping[str, Path], inputs: Iterable[Path]) -> None:
    """Refuse an output that is one of ``inputs``, or one file named for two outputs.

    Args:
        outputs: what each output is ("label map of case7") -> its path.
        inputs: every file the command reads.

    Raises:
        InputError: naming the output, the input (or other output) and what was expected.
    """
    inputs = list(inputs)
    for what, output in outputs.items():
        for source in inputs:
            if same_file(output, source):
                raise InputError(
                    f"{output}: is the input {source}; refusing to write the {what} over an input, even with "
                    "--force; expected another output name"
                )
    named = list(outputs.items())
    for index, (what, output) in enumerate(named):
        for other_what, other in named[index + 1 :]:
            if same_file(output, other):
                raise InputError(
                    f"{output}: both the {what} and the {other_what} would be written there; expected two paths"
                )


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output file that cannot be created: a name too long for the file system, a folder
    in its place, a file where a folder of its path should be, or a folder without write permission.

    Raises:
        InputError: naming the path, the obstacle and what was expected.
    """
    path = Path(path)
    size = len(os.fsencode(path.name))
    if size > NAME_MAX:
        raise InputError(
            f"{path}: a name of {size} bytes cannot be created (file systems take at most {NAME_MAX}); "
            f"expected a shorter name for the {what} (rename the input, or name the output with -o)"
        )
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file name for the {what}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{path}: cannot be written: {parent} is a file, not a folder; expected a folder there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot be written: no permission to write in {parent}")
