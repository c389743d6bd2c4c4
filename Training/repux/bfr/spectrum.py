"""Radial power spectra of 3-D kernels: where in frequency a set of large kernels puts its energy.

The frequency prior m = a / (d + a) lets taps far from the kernel centre learn slowly, which
should keep learned kernels smooth, i.e. damp their high spatial frequencies relative to
training without the prior. These functions measure that on trained weights.

A kernel's power spectrum |DFT|^2 is taken on a zero-padded grid (a finer sampling of the
same continuous spectrum) and divided by its mean over all frequencies, so that every
kernel counts the same whatever its norm and a single non-zero tap (an all-pass kernel) is
exactly 1 everywhere. Frequencies are in cycles per voxel; the radius |f| runs from 0 to
sqrt(3)/2 (the corner of the Nyquist cube).
"""

from __future__ import annotations

import math

import torch

#: Largest radial frequency of a 3-D grid, in cycles per voxel (the Nyquist cube's corner).
MAX_RADIUS = math.sqrt(3) / 2


def _radii(size: int, device: torch.device) -> torch.Tensor:
    """|f| in cycles/voxel of every DFT bin of a size^3 grid, shape (size, size, size)."""
    f = torch.fft.fftfreq(size, device=device, dtype=torch.float64)
    return torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)


def normalised_power(kernels: torch.Tensor, size: int = 48) -> torch.Tensor:
    """Power spectra of ``kernels`` (N, k, k, k) on a size^3 grid, each with mean 1.

    Kernels whose taps are all zero have no spectrum and are dropped.

    Returns:
        (N', size, size, size) float64.
    """
    if kernels.dim() != 4 or len(set(kernels.shape[1:])) != 1:
        raise ValueError(f"kernels of shape {tuple(kernels.shape)}: expected (N, k, k, k)")
    if kernels.shape[-1] > size:
        raise ValueError(f"grid size {size}: smaller than the kernels' side {kernels.shape[-1]}")
    power = torch.fft.fftn(kernels.to(torch.float64), s=(size,) * 3, dim=(1, 2, 3)).abs() ** 2
    mean = power.mean(dim=(1, 2, 3))
    keep = mean > 0
    return power[keep] / mean[keep, None, None, None]


def radial_power_spectrum(kernels: torch.Tensor, bins: int = 24, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean normalised power in shells of |f| (see the module docstring), averaged over kernels.

    Args:
        kernels: (N, k, k, k).
        bins: shells of equal width between 0 and :data:`MAX_RADIUS`.

    Returns:
        ``(centres, power)``: shell centres in cycles/voxel and the mean power in each
        (bins,), float64; 1.0 in every shell for an all-pass kernel.
    """
    power = normalised_power(kernels, size)
    radius = _radii(size, power.device).reshape(-1)
    edges = torch.linspace(0, MAX_RADIUS, bins + 1, dtype=torch.float64)
    shell = torch.bucketize(radius, edges[1:-1])  # 0..bins-1
    counts = torch.bincount(shell, minlength=bins).to(torch.float64)
    mean_power = power.reshape(power.shape[0], -1).mean(dim=0)
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, shell, mean_power)
    return (edges[:-1] + edges[1:]) / 2, sums / counts


def high_frequency_share(kernels: torch.Tensor, cutoff: float = 0.25, size: int = 48) -> float:
    """Share of the kernels' power at |f| above ``cutoff`` cycles/voxel (mean over kernels).

    An all-pass kernel has the share of the frequency grid beyond the cutoff (about 0.93
    for 0.25 cycles/voxel); a smooth kernel has less.
    """
    power = normalised_power(kernels, size)
    high = _radii(size, power.device) > cutoff
    return float((power[:, high].sum(dim=1) / power.reshape(power.shape[0], -1).sum(dim=1)).mean())
