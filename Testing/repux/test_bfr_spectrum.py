"""Radial power spectra of kernels (repux.bfr.spectrum) on kernels whose spectra are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repux.bfr import frequency_prior
from repux.bfr.spectrum import MAX_RADIUS, high_frequency_share, radial_power_spectrum

K = 21


def delta(position: tuple[int, int, int]) -> torch.Tensor:
    kernel = torch.zeros(1, K, K, K)
    kernel[(0, *position)] = 3.0
    return kernel


def gaussian(sigma: float) -> torch.Tensor:
    r = torch.arange(K, dtype=torch.float64) - K // 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return (g[:, None, None] * g[None, :, None] * g[None, None, :])[None]


def test_a_single_tap_is_all_pass_wherever_it_sits():
    for position in [(10, 10, 10), (0, 3, 20)]:
        centres, power = radial_power_spectrum(delta(position), bins=12, size=32)
        assert torch.allclose(power, torch.ones(12, dtype=torch.float64))
        assert centres[0] > 0 and centres[-1] < MAX_RADIUS


def test_high_frequency_share_of_an_all_pass_kernel_is_the_grid_share_beyond_the_cutoff():
    f = np.fft.fftfreq(32)
    radius = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    expected = float((radius > 0.25).mean())
    assert high_frequency_share(delta((10, 10, 10)), cutoff=0.25, size=32) == pytest.approx(expected)


def test_smooth_kernels_put_their_power_at_low_frequencies():
    _, power = radial_power_spectrum(gaussian(2.0), bins=12, size=32)
    assert bool((power[1:] <= power[:-1] + 1e-12).all())  # falls with |f|
    assert power[0] > 10 and power[-1] < 1e-6
    wide, narrow = high_frequency_share(gaussian(2.0)), high_frequency_share(gaussian(0.7))
    assert wide < narrow < high_frequency_share(delta((10, 10, 10)))


def test_a_checkerboard_sits_at_the_highest_frequency():
    i, j, k = torch.meshgrid(*(torch.arange(K),) * 3, indexing="ij")
    board = ((-1.0) ** (i + j + k))[None]
    _, power = radial_power_spectrum(board, bins=12, size=42)
    assert int(power.argmax()) == 11
    assert high_frequency_share(board, size=42) > 0.99


def test_a_spatial_envelope_does_not_low_pass_white_noise():
    # Why the ablation measures trained kernels: W0 = m * V0 is as white as V0 (multiplying
    # by the prior is a window in space, i.e. a blur of the spectrum, not a low-pass filter).
    noise = torch.randn(64, K, K, K, generator=torch.Generator().manual_seed(0))
    prior = frequency_prior(K, 1.0, dtype=torch.float32)
    assert high_frequency_share(noise * prior) == pytest.approx(high_frequency_share(noise), abs=0.02)
    assert high_frequency_share(noise) > 0.9 * high_frequency_share(delta((10, 10, 10)))


def test_zero_kernels_are_dropped_and_bad_shapes_refused():
    kernels = torch.cat([torch.zeros(2, K, K, K), delta((10, 10, 10))])
    _, power = radial_power_spectrum(kernels, bins=6, size=24)
    assert torch.allclose(power, torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected \\(N, k, k, k\\)"):
        radial_power_spectrum(torch.zeros(K, K, K))
    with pytest.raises(ValueError, match="smaller than the kernels"):
        radial_power_spectrum(delta((1, 1, 1)), size=16)
