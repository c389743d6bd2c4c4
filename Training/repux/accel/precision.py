"""Whether a device computes bfloat16 natively (so that bf16 autocast is a speed-up)."""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "native_bfloat16"]

PRECISIONS = ("float32", "bfloat16")


def native_bfloat16(device: torch.device | str) -> bool:
    """True on CUDA devices with bf16 support and on CPUs with AMX tiles or AVX-512 BF16.

    Without them oneDNN emulates bf16 convolutions and matrix products: on an AVX2-only CPU
    a bf16 matrix product measured over 100 times slower than in float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False
