"""Option values checked without torch, so that a typo fails before anything slow starts."""

from __future__ import annotations

import re

from repux.errors import InputError

#: ``--device`` values: auto (CUDA when present), cpu, cuda or cuda:N.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """``name`` when it is a device name repux accepts (whether that device exists is checked later).

    Raises:
        InputError: any other name.
    """
    if not _DEVICE_NAME.fullmatch(str(name)):
        raise InputError(f"--device {name}: unknown device; expected one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    return str(name)


def check_overlap(overlap: float | None) -> float | None:
    """``overlap`` when it is None (the bundle's) or a number 0 <= overlap < 1.

    Raises:
        InputError: any other value.
    """
    if overlap is not None and not 0.0 <= overlap < 1.0:
        raise InputError(f"--overlap {overlap}: expected a number 0 <= overlap < 1")
    return overlap
