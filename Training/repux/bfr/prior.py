"""The Bayesian frequency prior of RepUX-Net: how fast each tap of a large kernel may learn."""

from __future__ import annotations

import math
import numbers

import torch

from repux.errors import InputError

__all__ = ["frequency_prior", "check_alpha"]


def check_alpha(alpha: object, what: str = "alpha") -> float:
    """``alpha`` as a float, or :class:`InputError` unless it is a finite number > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"{what} of the frequency prior must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def frequency_prior(kernel_size: int, alpha: float = 1.0, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The prior ``m = alpha / (d + alpha)`` of every element of a cubic kernel.

    ``d`` is the Euclidean distance in voxels from the element to the kernel centre, so the
    centre gets 1, its six face neighbours ``alpha / (1 + alpha)`` (0.5 for alpha 1) and the
    corners of a 21^3 kernel ``1 / (10 sqrt(3) + 1)``, about 0.0546: taps far from the centre
    (the kernel's high spatial frequencies) learn slowly.

    Args:
        kernel_size: side k of the kernel, odd and >= 1 (so that it has a centre voxel).
        alpha: the prior's width, > 0; larger values flatten it towards 1.
        dtype: floating dtype of the result (default: torch's default dtype). Computed in
            float64 and rounded once.

    Returns:
        Tensor (k, k, k) with values in (0, 1]; it broadcasts over a depthwise Conv3d weight
        of shape (C, 1, k, k, k).
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise InputError(f"kernel_size of the frequency prior must be an odd integer >= 1, got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(
            f"kernel_size of the frequency prior must be an odd integer >= 1 (a kernel with a centre voxel), "
            f"got {kernel_size}"
        )
    alpha = check_alpha(alpha)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise InputError(f"dtype of the frequency prior must be a floating dtype, got {dtype}")
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size // 2)
    dz, dy, dx = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    distance = torch.sqrt(dz * dz + dy * dy + dx * dx)
    return (alpha / (distance + alpha)).to(dtype)
