"""Depthwise 'same' 3-D convolution by FFT, for kernels too large for a direct convolution.

A direct depthwise convolution costs ``k^3`` multiply-adds per voxel (9261 for a 21^3
kernel); by FFT it costs a few dozen per voxel whatever ``k``. The result equals
``F.conv3d(x, weight, bias, padding=k // 2, groups=C)`` up to float32 rounding
(relative error ~1e-6 for 21^3 kernels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .kernel_support import centre_crop, reachable_kernel_size

__all__ = ["fft_depthwise_conv3d", "fft_length", "fft_lengths", "kernel_spectrum"]

#: Work memory (bytes) one channel chunk of the FFT may take: bounds the peak memory.
CHUNK_BYTES = 256 * 2**20


def fft_length(minimum: int) -> int:
    """The smallest ``n >= minimum`` whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    n = max(int(minimum), 1)
    while True:
        rest = n
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return n
        n += 1


def fft_lengths(sizes: Sequence[int], kernel: Sequence[int]) -> tuple[int, ...]:
    """FFT lengths for inputs of spatial ``sizes`` and a kernel of odd ``kernel`` sizes.

    ``n + k // 2`` suffices (not ``n + k - 1``): with the kernel centred at index 0, a tap
    that leaves the input on either side lands in the zero tail of the padded signal, so
    no circular wrap ever reaches an output voxel.
    """
    return tuple(fft_length(n + k // 2) for n, k in zip(sizes, kernel))


def kernel_spectrum(weight: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Conjugate spectrum of each depthwise kernel, laid out circularly around index 0.

    Args:
        weight: (C, 1, kd, kh, kw), odd sizes.
        lengths: the FFT lengths (:func:`fft_lengths`).

    Returns:
        (C, Ld, Lh, Lw // 2 + 1) complex64: the correlation with an input is the product of
        the input's spectrum by this one.
    """
    channels, _, *sizes = weight.shape
    padded = weight.new_zeros((channels, *lengths), dtype=torch.float32)
    padded[(slice(None), *(slice(0, k) for k in sizes))] = weight[:, 0].float()
    centred = torch.roll(padded, shifts=[-(k // 2) for k in sizes], dims=(1, 2, 3))
    return torch.fft.rfftn(centred, dim=(1, 2, 3)).conj_physical()


def fft_depthwise_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    spectrum: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=k // 2, groups=C)`` computed by FFT in float32.

    Args:
        x: (B, C, D, H, W), any float dtype and memory format.
        weight: (C, 1, kd, kh, kw), odd sizes; taps that cannot reach the input (beyond
            ``n - 1`` voxels from the centre) are ignored.
        bias: (C,) or None.
        spectrum: :func:`kernel_spectrum` of the reachable part of ``weight`` for
            :func:`fft_lengths` of ``x`` (pass it when the same kernel meets many windows);
            computed when None.
        chunk_bytes: work memory per chunk of channels.

    Returns:
        (B, C, D, H, W) in ``x``'s dtype and memory format.
    """
    batch, channels, *sizes = x.shape
    weight = centre_crop(weight, tuple(reachable_kernel_size(k, n) for k, n in zip(weight.shape[2:], sizes)))
    lengths = fft_lengths(sizes, weight.shape[2:])
    if spectrum is None:
        spectrum = kernel_spectrum(weight, lengths)
    # Per channel: the complex spectrum (8 bytes per half-length point) and the real inverse.
    per_channel = batch * math.prod(lengths) * (4 + 4)
    step = max(1, min(channels, chunk_bytes // per_channel))
    out = torch.empty_like(x)
    crop = (slice(None), slice(None), *(slice(0, n) for n in sizes))
    for start in range(0, channels, step):
        stop = min(start + step, channels)
        signal = torch.fft.rfftn(x[:, start:stop].float(), s=lengths, dim=(2, 3, 4))
        signal.mul_(spectrum[start:stop])
        result = torch.fft.irfftn(signal, s=lengths, dim=(2, 3, 4))[crop]
        if bias is not None:
            result = result + bias[start:stop].float().view(1, -1, 1, 1, 1)
        out[:, start:stop] = result
    return out
