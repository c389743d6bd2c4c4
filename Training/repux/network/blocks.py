"""Encoder building blocks of RepUX-Net and 3D UX-Net, with state_dict names of the published code.

Every tensor below is channels-first, shape (B, C, D, H, W).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelsFirstLayerNorm", "RepUXBlock", "UXBlock", "large_kernel_convs"]


class ChannelsFirstLayerNorm(nn.Module):
    """Layer normalisation over the channel axis of a (B, C, D, H, W) tensor.

    For each voxel: ``(x - mean_c) / sqrt(var_c + eps) * weight + bias``, with the biased
    variance over the C channels and a per-channel affine (parameters ``weight``, ``bias``).

    Args:
        num_channels: C.
        eps: added to the variance inside the square root.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32: a half-precision variance over hundreds of channels loses
        # too many digits (and can overflow) under mixed-precision inference.
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=1, keepdim=True, correction=0)
        normalised = (x32 - mean) * torch.rsqrt(var + self.eps)
        affine_shape = (1, -1) + (1,) * (x.ndim - 2)
        out = normalised * self.weight.view(affine_shape).float() + self.bias.view(affine_shape).float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RepUXBlock(nn.Module):
    """RepUX-Net block: large depthwise conv -> BatchNorm -> GELU, without residual.

    The depthwise kernel ``dwconv`` is the one the Bayesian frequency prior acts on (in the
    optimizer); the forward pass is a plain convolution with the stored weight.

    Args:
        channels: C (input and output width).
        kernel_size: side of the cubic depthwise kernel (odd, so that the size is kept).
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=True
        )
        self.norm = nn.BatchNorm3d(channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.dwconv(x)))


class UXBlock(nn.Module):
    """3D UX-Net block with a residual connection.

    depthwise 7^3 conv -> LayerNorm over channels -> ``pwconv1`` (C -> 4C, 1^3, groups C)
    -> GELU -> ``pwconv2`` (4C -> C, 1^3, groups C) -> times ``gamma`` (per channel) -> + input.
    The grouped 1^3 convs are the form the published UX-Net weights use.

    Args:
        channels: C.
        kernel_size: side of the depthwise kernel (7 in the published network).
        layer_scale_init: initial value of every element of ``gamma``.
    """

    def __init__(self, channels: int, kernel_size: int = 7, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=True
        )
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Conv3d(channels, 4 * channels, 1, groups=channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(4 * channels, channels, 1, groups=channels)
        self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        # nn.LayerNorm normalises the last axis: move channels there and back.
        y = self.norm(y.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        return x + y * self.gamma.view(1, -1, 1, 1, 1)


def large_kernel_convs(model: nn.Module) -> list[tuple[str, nn.Conv3d]]:
    """The depthwise spatial kernels of the encoder blocks, with their qualified names.

    For a RepUX-Net these are the large (``ks``^3) kernels that the Bayesian frequency prior
    re-parameterizes. For a 3D UX-Net they are its 7^3 depthwise kernels: the prior can be
    applied to them as well, but the published UX-Net was trained without it, so a trainer
    decides whether to do so. The stem conv and the downsampling convs are never included.

    Blocks are found by type, so names keep any wrapper prefix (``module.`` of
    DistributedDataParallel, ``_orig_mod.`` of ``torch.compile``).

    Returns:
        ``[(name, conv), ...]`` in module order, e.g. ``("repuxnet_3d.stages.0.0.dwconv", conv)``.
    """
    return [
        (f"{name}.dwconv" if name else "dwconv", module.dwconv)
        for name, module in model.named_modules()
        if isinstance(module, (RepUXBlock, UXBlock))
    ]
