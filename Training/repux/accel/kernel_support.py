"""The effective support of a convolution kernel: the taps that can change its output.

Two kinds of taps never contribute and can be cut away without changing the function:

- shells of exact zeros around the centre (:func:`effective_kernel_size`): the published
  RepUX-Net training multiplies its large kernels by the frequency prior on every forward
  pass, so its checkpoints hold kernels that are zero outside the centre (a 21^3 conv that
  is really 1^3). Only the weights tell: the support is measured, never assumed;
- taps farther from the centre than the input is long (:func:`reachable_kernel_size`):
  with zero padding, a tap at offset ``t`` along an axis of ``n`` voxels only ever meets
  padding when ``|t| >= n`` (a 21^3 kernel on a 6^3 input acts as its central 11^3).
"""

from __future__ import annotations

import torch

__all__ = ["centre_crop", "effective_kernel_size", "reachable_kernel_size"]


def effective_kernel_size(weight: torch.Tensor) -> int:
    """Side of the smallest centred cube outside which every tap of ``weight`` is exactly 0.

    Args:
        weight: (C_out, C_in, k, k, k) with odd ``k``.

    Returns:
        An odd size ``2r + 1 <= k``: 1 when only the centre (or nothing) is non-zero.
        NaN taps count as non-zero.
    """
    sizes = weight.shape[2:]
    if any(k % 2 == 0 for k in sizes) or len(set(sizes)) != 1:
        raise ValueError(f"kernel of shape {tuple(weight.shape)}: expected a cube with an odd side")
    nonzero = (weight != 0).flatten(0, 1).any(dim=0)
    if not bool(nonzero.any()):
        return 1
    centre = sizes[0] // 2
    offsets = (torch.nonzero(nonzero) - centre).abs()
    return 2 * int(offsets.max()) + 1


def reachable_kernel_size(kernel_size: int, length: int) -> int:
    """Taps along one axis that can meet input voxels: ``min(k, 2 * length - 1)`` (odd k)."""
    return min(kernel_size, 2 * length - 1)


def centre_crop(weight: torch.Tensor, sizes: tuple[int, int, int]) -> torch.Tensor:
    """The central ``sizes`` taps of ``weight`` (C_out, C_in, kd, kh, kw); odd sizes, <= the kernel's."""
    slices = []
    for k, s in zip(weight.shape[2:], sizes):
        if s % 2 == 0 or s > k:
            raise ValueError(f"cannot crop a kernel of shape {tuple(weight.shape)} to {sizes}: expected odd sizes <= it")
        slices.append(slice((k - s) // 2, (k + s) // 2))
    return weight[(slice(None), slice(None), *slices)]
