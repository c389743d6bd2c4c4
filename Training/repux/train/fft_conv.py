"""Large depthwise kernels by FFT while training: the same convolution, its gradients far cheaper on a CPU.

PyTorch's CPU backward of a depthwise Conv3d computes the input and weight gradients
through generic paths at about k^3 multiply-adds per voxel each, 10-100x slower than its
forward pass: with RepUX-Net's 21^3 kernels one training step of even a small network
takes minutes (measured: 27 s for one 8-channel 24^3 block, 0.5 s by FFT). The
convolution theorem gives the same result to float32 rounding (~1e-6 relative) in
O(n log n), and autograd differentiates ``torch.fft`` with FFTs as well, so both
gradients come at the price of the forward pass. The FFT itself is
:func:`repux.accel.fft_depthwise_conv3d` (the inference accelerator's).

:func:`use_fft_kernels` swaps a network's large depthwise convs for
:class:`FFTDepthwiseConv3d`, which keeps the very same ``weight`` and ``bias`` parameters:
state_dict keys, optimizer groups, hooks registered afterwards and exported bundles are
those of the plain network.
"""

from __future__ import annotations

import torch
from torch import nn

from repux.accel import fft_depthwise_conv3d
from repux.network import large_kernel_convs

#: Kernels from this side up go by FFT (a 7^3 kernel's direct CPU backward is fast enough).
FFT_MIN_KERNEL = 9


class FFTDepthwiseConv3d(nn.Conv3d):
    """A depthwise ``nn.Conv3d`` (stride 1, zero padding k//2) evaluated by FFT, trainable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fft_depthwise_conv3d(x, self.weight, self.bias)


def _fft_compatible(conv: nn.Conv3d) -> bool:
    k = conv.kernel_size
    return (
        all(side % 2 == 1 for side in k)
        and max(k) >= FFT_MIN_KERNEL
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.padding == tuple(side // 2 for side in k)
        and conv.padding_mode == "zeros"
    )


def use_fft_kernels(network: nn.Module) -> list[str]:
    """Replace the network's large depthwise convs by FFT ones sharing their parameters.

    Call it before building the optimizer or registering hooks on the convs.

    Returns:
        The qualified names of the replaced convs.
    """
    replaced = []
    for name, conv in large_kernel_convs(network):
        if isinstance(conv, FFTDepthwiseConv3d) or not _fft_compatible(conv):
            continue
        fft_conv = FFTDepthwiseConv3d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=conv.padding,
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",
        )
        fft_conv.weight = conv.weight
        fft_conv.bias = conv.bias
        parent_name, _, attribute = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, attribute, fft_conv)
        replaced.append(name)
    return replaced
