"""Option values checked without torch, so that a typo fails before anything slow starts."""

from __future__ import annotations

import re

from repux.errors import InputError

#: ``--device`` values: auto (CUDA when present), cpu, cuda or cuda:N.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
#: The one help text of ``--device`` in every command (the README's tables say the same).
DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"
#: The one help text of ``--fast``; the hardware list is :func:`repux.accel.native_bfloat16`'s.
FAST_HELP = (
    "bfloat16 where the device computes it natively (CUDA GPUs, CPUs with AMX or AVX-512 BF16; float32 "
    "elsewhere, with a note): faster, labels may differ at a few voxels"
)

#: ``--windows`` values: organ-guided windows (the default) or every window of the grid.
WINDOW_MODES = ("organs", "all")
DEFAULT_WINDOWS = "organs"
#: The one help text of ``--windows`` (``repux segment``; the README's table says the same).
WINDOWS_HELP = (
    "which sliding windows run: 'organs' (default) runs every second window along each axis, finds the "
    "organs, then only the other windows near them (the result near the organs equals the full grid's); "
    "'all' runs every window"
)


def check_windows(mode: str) -> str:
    """``mode`` when it is one of :data:`WINDOW_MODES`.

    Raises:
        InputError: any other value.
    """
    if mode not in WINDOW_MODES:
        raise InputError(f"--windows {mode}: expected one of {', '.join(WINDOW_MODES)}")
    return mode


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

#: Default low-confidence threshold of the review maps: the chosen label has less than an even chance.
LOW_CONFIDENCE = 0.5
#: Help of ``--tta`` (``repux segment``, ``repux rank``).
TTA_HELP = (
    "test-time augmentation: 'flips' averages each window over its 8 mirror images "
    "(as nnU-Net; 8 times the network's work)"
)
#: Help of ``--low-confidence``.
LOW_CONFIDENCE_HELP = f"confidence below which a voxel counts as low-confidence (0..1, default {LOW_CONFIDENCE})"
