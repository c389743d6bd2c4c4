"""Folding an eval-mode BatchNorm into the convolution before it.

In eval mode BatchNorm is a per-channel affine map with its running statistics, so
``bn(conv(x))`` is one convolution with scaled weights and a shifted bias: exact up to
float rounding, and one pass over the activations fewer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_batchnorm"]


def fold_batchnorm(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.BatchNorm3d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the convolution equal to ``norm(conv(x))`` in eval mode.

    Args:
        weight: conv weight (C_out, ...).
        bias: conv bias (C_out,) or None.
        norm: BatchNorm over the C_out channels with running statistics.

    Returns:
        ``(weight * s, (bias - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``,
        computed in float64 and returned in ``weight``'s dtype.
    """
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded (track_running_stats=False)")
    channels = weight.shape[0]
    var = norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + norm.eps)
    conv_bias = bias.double() if bias is not None else torch.zeros_like(var)
    folded_weight = weight.double() * scale.view(channels, *([1] * (weight.ndim - 1)))
    folded_bias = (conv_bias - norm.running_mean.double()) * scale + beta
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)
