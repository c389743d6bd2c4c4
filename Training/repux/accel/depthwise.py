"""A depthwise 'same' 3-D convolution that evaluates itself the cheapest exact way.

:class:`DepthwiseConv3d` computes ``F.conv3d(x, weight, bias, padding=k // 2, groups=C)``
for a stride-1 depthwise kernel. Per input shape it first drops the taps that cannot
contribute (:mod:`.kernel_support`), then picks one of:

- ``affine``: a 1^3 kernel is a per-channel scale and shift;
- ``direct``: ``F.conv3d`` with the cropped kernel (oneDNN on CPUs, cuDNN on GPUs);
- ``fft``: :func:`~.fft_conv.fft_depthwise_conv3d`, when the kernel is large for the input.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .fft_conv import fft_depthwise_conv3d, fft_lengths, kernel_spectrum
from .kernel_support import centre_crop, reachable_kernel_size

__all__ = ["DEPTHWISE_METHODS", "DepthwiseConv3d", "FFT_BREAK_EVEN"]

DEPTHWISE_METHODS = ("auto", "direct", "fft")

#: ``auto`` uses the FFT when taps x voxels / FFT points exceeds this. Measured on 2 AVX2
#: cores (float32, widths 48..384 on 48^3..6^3 inputs): a direct depthwise tap costs about
#: 1/280 of an FFT point (forward and inverse transform); 500 leaves a margin so that
#: ``auto`` never picks the FFT where the two are close (e.g. 11^3 taps on 12^3 inputs).
FFT_BREAK_EVEN = 500.0

#: Kernel spectra kept per convolution: one per window shape and device (windows share one).
SPECTRA_KEPT = 2


class DepthwiseConv3d(nn.Module):
    """Depthwise 'same' convolution (stride 1, zero padding k // 2) by the cheapest exact method.

    Args:
        weight: (C, 1, kd, kh, kw) with odd sizes (trim zero shells before, see
            :func:`~.kernel_support.effective_kernel_size`).
        bias: (C,) or None.
        method: "auto" (per input shape), "direct" or "fft" (1^3 kernels are always an affine map).

    Forward: (B, C, D, H, W) -> (B, C, D, H, W), same dtype and memory format.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, method: str = "auto") -> None:
        super().__init__()
        if weight.ndim != 5 or weight.shape[1] != 1 or any(k % 2 == 0 for k in weight.shape[2:]):
            raise ValueError(f"depthwise kernel of shape {tuple(weight.shape)}: expected (C, 1, kd, kh, kw), odd sizes")
        if method not in DEPTHWISE_METHODS:
            raise ValueError(f"depthwise method {method!r}: expected one of {', '.join(DEPTHWISE_METHODS)}")
        self.method = method
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._spectra: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @property
    def kernel_size(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape[2:])  # type: ignore[return-value]

    def plan(self, sizes: tuple[int, ...]) -> tuple[str, tuple[int, int, int]]:
        """The method and the (cropped) kernel sizes used for inputs of spatial ``sizes``."""
        kernel = tuple(reachable_kernel_size(k, n) for k, n in zip(self.kernel_size, sizes))
        if kernel == (1, 1, 1):
            return "affine", kernel  # type: ignore[return-value]
        if self.method != "auto":
            return self.method, kernel  # type: ignore[return-value]
        taps_per_point = math.prod(kernel) * math.prod(sizes) / math.prod(fft_lengths(sizes, kernel))
        return ("fft" if taps_per_point > FFT_BREAK_EVEN else "direct"), kernel  # type: ignore[return-value]

    def _spectrum(self, weight: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        lengths = fft_lengths(sizes, weight.shape[2:])
        key = (lengths, tuple(weight.shape), weight.device)
        if key not in self._spectra:
            while len(self._spectra) >= SPECTRA_KEPT:
                self._spectra.popitem(last=False)
            self._spectra[key] = kernel_spectrum(weight, lengths)
        return self._spectra[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = tuple(x.shape[2:])
        method, kernel = self.plan(sizes)
        weight = centre_crop(self.weight, kernel)
        if method == "affine":
            scale = weight.view(1, -1, 1, 1, 1).to(x.dtype)
            if self.bias is None:
                return x * scale
            return torch.addcmul(self.bias.view(1, -1, 1, 1, 1).to(x.dtype), x, scale)
        if method == "fft":
            return fft_depthwise_conv3d(x, weight, self.bias, self._spectrum(weight, sizes))
        padding = tuple(k // 2 for k in kernel)
        return F.conv3d(x, weight.contiguous(), self.bias, padding=padding, groups=weight.shape[0])

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Moving or casting the module makes cached spectra stale.
        self._spectra.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={self.kernel_size}, method={self.method!r}"
