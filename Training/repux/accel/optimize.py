"""``optimize_for_inference``: a network computing the same function as the given one, faster.

Every rewrite is exact up to float rounding unless ``precision="bfloat16"`` is asked for:

- depthwise kernels of the encoder blocks lose their all-zero outer shells (measured per
  conv from the weights) and run as an affine map, a direct conv or an FFT conv, whichever
  is cheapest for the input shape (:class:`~.depthwise.DepthwiseConv3d`);
- the BatchNorm after a RepUX-Net block's depthwise conv is folded into that conv;
- activations in the channels-last 3-D memory format, where oneDNN's 3-D convolutions run
  ~1.5x faster; the instance norms become :class:`~.instance_norm.LayoutAwareInstanceNorm3d`,
  because PyTorch's own is 2-3x slower in that layout;
- windows that hold one constant value (air, once the intensity window clips it) are
  computed once and their logits reused (:class:`~.constant_inputs.ConstantInputMemo`);
- bfloat16 autocast where the device computes it natively (CUDA GPUs with bf16, CPUs with
  AMX or AVX-512 BF16); elsewhere float32 is kept and the report says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..network.blocks import RepUXBlock, UXBlock
from .batchnorm_fold import fold_batchnorm
from .constant_inputs import ConstantInputMemo
from .depthwise import DEPTHWISE_METHODS, DepthwiseConv3d
from .instance_norm import LayoutAwareInstanceNorm3d, replaceable_instance_norm
from .kernel_support import centre_crop, effective_kernel_size
from .precision import PRECISIONS, native_bfloat16

__all__ = ["InferenceOptions", "OptimizedNetwork", "optimize_for_inference"]


@dataclass(frozen=True)
class InferenceOptions:
    """What :func:`optimize_for_inference` may do.

    Attributes:
        trim_kernels: cut all-zero outer shells off the encoder's depthwise kernels.
        fold_batchnorm: fold a RepUX-Net block's BatchNorm into its depthwise conv.
        depthwise: "auto", "direct" or "fft" evaluation of the depthwise convs.
        channels_last: run in the channels-last 3-D memory format (see above).
        reuse_constant_windows: compute constant inputs once (exact).
        precision: "float32" or "bfloat16" (autocast; float32 kept where not native).
    """

    trim_kernels: bool = True
    fold_batchnorm: bool = True
    depthwise: str = "auto"
    channels_last: bool = True
    reuse_constant_windows: bool = True
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.depthwise not in DEPTHWISE_METHODS:
            raise ValueError(f"depthwise={self.depthwise!r}: expected one of {', '.join(DEPTHWISE_METHODS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")


@dataclass
class OptimizationReport:
    """What was done: one line per rewritten layer, plus notes."""

    layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.notes + self.layers)


class OptimizedNetwork(nn.Module):
    """The rewritten network behind the same call: (B, C_in, D, H, W) -> float32 logits.

    Attributes:
        network: the rewritten copy.
        channels_last: inputs are converted to channels-last 3-D before the network.
        autocast_dtype: bfloat16 when autocast is on, else None.
        report: :class:`OptimizationReport`.
        constant_inputs: the memo of constant windows' logits, or None.
    """

    def __init__(
        self,
        network: nn.Module,
        channels_last: bool,
        autocast_dtype: torch.dtype | None,
        report: OptimizationReport,
        reuse_constant_windows: bool = False,
    ) -> None:
        super().__init__()
        self.network = network
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        self.report = report
        self.constant_inputs = ConstantInputMemo() if reuse_constant_windows else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant_inputs is None:
            return self._logits(x)
        return self.constant_inputs(self._logits, x)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Remembered logits belong to the weights as they were.
        if self.constant_inputs is not None:
            self.constant_inputs.clear()
        return super()._apply(fn, recurse)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.autocast_dtype is None:
            logits = self.network(x)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                logits = self.network(x)
        return logits.float().contiguous()


def _depthwise_same(conv: nn.Module) -> bool:
    """Whether ``conv`` is a stride-1, zero-padded 'same' depthwise Conv3d with an odd cubic kernel."""
    if not isinstance(conv, nn.Conv3d):
        return False
    k = conv.kernel_size
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and len(set(k)) == 1
        and k[0] % 2 == 1
        and conv.stride == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.padding == tuple(s // 2 for s in k)
        and conv.padding_mode == "zeros"
    )


def _rewrite_blocks(network: nn.Module, options: InferenceOptions, report: OptimizationReport) -> None:
    blocks = [
        (name, block)
        for name, block in network.named_modules()
        if isinstance(block, (RepUXBlock, UXBlock)) and _depthwise_same(block.dwconv)
    ]
    for name, block in blocks:
        conv = block.dwconv
        weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        done = []
        if options.trim_kernels:
            size = effective_kernel_size(weight)
            if size < conv.kernel_size[0]:
                weight = centre_crop(weight, (size,) * 3)
                done.append(f"{conv.kernel_size[0]}^3 -> {size}^3 (zero shells)")
        if options.fold_batchnorm and isinstance(block, RepUXBlock) and isinstance(block.norm, nn.BatchNorm3d):
            weight, bias = fold_batchnorm(weight, bias, block.norm)
            block.norm = nn.Identity()
            done.append("BatchNorm folded")
        block.dwconv = DepthwiseConv3d(weight, bias, options.depthwise)
        report.layers.append(f"{name}.dwconv: " + ", ".join(done + [f"{options.depthwise} evaluation"]))


def _replace_instance_norms(network: nn.Module, report: OptimizationReport) -> None:
    replaced = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if replaceable_instance_norm(child):
                setattr(parent, name, LayoutAwareInstanceNorm3d.replacing(child))
                replaced += 1
    if replaced:
        report.notes.append(f"{replaced} instance norms computed layout-aware (channels-last statistics by matrix products)")


def optimize_for_inference(
    network: nn.Module,
    device: torch.device | str = "cpu",
    options: InferenceOptions | None = None,
    in_place: bool = False,
) -> OptimizedNetwork:
    """An eval-mode copy of ``network`` that computes the same function faster on ``device``.

    ``network`` itself is left unchanged unless ``in_place``. Input and output are those of
    ``network`` (output always float32, contiguous).

    Args:
        network: a RepUX-Net or 3D UX-Net (other modules pass through unchanged but for the
            memory format and precision options).
        device: where the copy will run (decides bf16 availability).
        options: :class:`InferenceOptions`; defaults are exact rewrites in float32.
        in_place: rewrite ``network`` itself, which is then consumed (its modules are
            replaced): no copy of every weight (0.17 s and 260 MB at the paper's width), for
            a caller that built the network only to optimize it.
    """
    options = options or InferenceOptions()
    device = torch.device(device)
    report = OptimizationReport()
    rewritten = (network if in_place else copy.deepcopy(network)).eval()
    with torch.no_grad():
        _rewrite_blocks(rewritten, options, report)
    rewritten = rewritten.to(device)
    if options.channels_last:
        _replace_instance_norms(rewritten, report)
        rewritten = rewritten.to(memory_format=torch.channels_last_3d)
    autocast_dtype = None
    if options.precision == "bfloat16":
        if native_bfloat16(device):
            autocast_dtype = torch.bfloat16
        else:
            report.notes.append(f"bfloat16 is not native on {device} (emulated, far slower): kept float32")
    return OptimizedNetwork(
        rewritten, options.channels_last, autocast_dtype, report, options.reuse_constant_windows
    ).eval()
