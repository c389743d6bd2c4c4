"""Memory a case needs, estimated before anything large is allocated, and the memory there is.

A CT of huge voxels (100 mm) becomes a gigantic model grid at the model's spacing; without
this check the allocation fails deep in torch with a raw error, or the machine swaps.
"""

from __future__ import annotations

import os
import sys

from repux.errors import InputError

#: Activation memory of the network (bytes) that inference keeps on top of the volumes:
#: :data:`repux.infer.predict.CPU_ACTIVATION_BUDGET`, repeated here to stay torch-free.
ACTIVATION_BYTES = int(1.5 * 2**30)


def case_memory_bytes(
    input_voxels: int,
    input_bytes: int,
    model_voxels: int,
    padded_voxels: int,
    channels: int,
    probabilities: bool,
    review_maps: bool = False,
) -> int:
    """Peak host memory (bytes) of one case, an upper bound at every stage.

    Args:
        input_voxels, input_bytes: voxels of the input volume and the bytes its array holds.
        model_voxels: voxels of the whole model grid (the input resampled to the model spacing).
        padded_voxels: voxels of the network input (the body crop, padded; at most the model
            grid raised to the patch grid).
        channels: output channels (labels) of the network.
        probabilities: whether the probabilities are kept on the input grid.
        review_maps: whether the confidence and entropy maps (a byte each) and a region mask are kept.

    Counted: the input and its float32 copy, the resampled model grid (float32), the network
    input, the stitched logits plus MONAI's weight map (``channels + 1`` float32 volumes),
    the activations, the label map, and two copies of ``channels`` float32 probability
    volumes on the input grid when they are kept.
    """
    volumes = input_bytes + 4 * input_voxels + 4 * model_voxels + 4 * padded_voxels * (channels + 2)
    kept = 2 * 4 * channels * input_voxels if probabilities else 0
    review = 3 * input_voxels if review_maps else 0
    return volumes + ACTIVATION_BYTES + 2 * input_voxels + kept + review


def available_memory_bytes() -> int | None:
    """Memory this process can take without swapping (Linux: MemAvailable), else physical memory, or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "win32":
        return _windows_available()
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _windows_available() -> int | None:
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
            (name, ctypes.c_ulonglong)
            for name in ("total", "available", "page_total", "page_free", "virtual_total", "virtual_free", "extended")
        ]

    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.available)


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


def require_memory(needed: int, source: str, what: str) -> None:
    """Refuse a case that needs more memory than is available.

    Raises:
        InputError: naming ``source``, the figure needed, the figure available and ``what`` makes it large.
    """
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise InputError(
            f"{source}: needs about {_gigabytes(needed)} of memory ({what}); {_gigabytes(available)} is available; "
            "expected a scan that fits (check its voxel size), or more free memory"
        )
