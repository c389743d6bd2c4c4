"""Faster inference of the same function: kernel trimming, BatchNorm folding, FFT convolution,
constant windows computed once.

- :func:`optimize_for_inference` (:mod:`.optimize`): the rewritten network, with
  :class:`InferenceOptions` and a report of what was done.
- :class:`DepthwiseConv3d` (:mod:`.depthwise`): depthwise 'same' convolution by the cheapest
  exact method per input shape.
- :class:`ConstantInputMemo` (:mod:`.constant_inputs`): constant windows computed once.
- :func:`fft_depthwise_conv3d` (:mod:`.fft_conv`), :func:`effective_kernel_size`
  (:mod:`.kernel_support`), :func:`fold_batchnorm` (:mod:`.batchnorm_fold`),
  :func:`native_bfloat16` (:mod:`.precision`).
"""

from .batchnorm_fold import fold_batchnorm
from .constant_inputs import ConstantInputMemo
from .depthwise import DepthwiseConv3d
from .fft_conv import fft_depthwise_conv3d
from .kernel_support import effective_kernel_size
from .optimize import InferenceOptions, OptimizedNetwork, optimize_for_inference
from .precision import native_bfloat16

__all__ = [
    "ConstantInputMemo",
    "DepthwiseConv3d",
    "InferenceOptions",
    "OptimizedNetwork",
    "effective_kernel_size",
    "fft_depthwise_conv3d",
    "fold_batchnorm",
    "native_bfloat16",
    "optimize_for_inference",
]
