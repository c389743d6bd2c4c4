"""Instance normalisation that stays fast in the channels-last 3-D memory format.

oneDNN's 3-D convolutions run about 1.5x faster on channels-last activations (measured at
48-96 channels on 48^3-96^3 inputs, 2 AVX2 cores), but PyTorch's own instance norm takes
2-3x longer on them than on contiguous ones, which cancelled the gain over the whole
network. :class:`LayoutAwareInstanceNorm3d` computes the statistics of a channels-last
input with matrix products over its (voxels, channels) view instead, as fast as the
contiguous case, so the convolutions keep their gain.

Under bfloat16 autocast the statistics are computed outside autocast (it would round the
matrix products' operands to bfloat16), and bfloat16 activations take ATen's group norm
with one channel per group instead: see :meth:`LayoutAwareInstanceNorm3d.forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayoutAwareInstanceNorm3d", "replaceable_instance_norm"]

#: Rows summed by one matrix product before the partial sums are added in float64: a
#: float32 product over a whole 96^3 window drifts by ~1e-5, which a network amplifies.
ROWS_PER_PARTIAL_SUM = 4096


def _column_sums(rows: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Sums over N of (B, N, C) ``rows``, or of their squares: (B, 1, C) float64.

    Blocks of :data:`ROWS_PER_PARTIAL_SUM` rows are summed by matrix products (with a row
    of ones, or as the diagonal of the block's Gram matrix), the blocks' sums in float64.
    """
    batch, count, channels = rows.shape
    whole = count - count % ROWS_PER_PARTIAL_SUM
    total = rows.new_zeros((batch, 1, channels), dtype=torch.float64)
    for start, stop in ((0, whole), (whole, count)):
        if stop == start:
            continue
        size = min(ROWS_PER_PARTIAL_SUM, stop - start)
        blocks = rows[:, start:stop].unflatten(1, (-1, size))  # (B, blocks, size, C)
        if squared:
            partial = torch.diagonal(blocks.transpose(2, 3) @ blocks, dim1=2, dim2=3)
        else:
            partial = (blocks.new_ones(1, 1, 1, size) @ blocks)[:, :, 0]
        total += partial.double().sum(dim=1, keepdim=True)
    return total


def replaceable_instance_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an InstanceNorm3d that :class:`LayoutAwareInstanceNorm3d` computes exactly."""
    return isinstance(module, nn.InstanceNorm3d) and not module.affine and not module.track_running_stats


class LayoutAwareInstanceNorm3d(nn.Module):
    """``F.instance_norm(x, eps=eps)`` (no affine, no running statistics) for any memory format.

    Forward: (B, C, D, H, W) -> the same shape, dtype and memory format. A channels-last
    input is viewed as (B, N, C) with N = D * H * W: the per-channel mean is one matrix
    product with a row of ones, the biased variance the diagonal of the centred
    (C, C) Gram matrix; the statistics accumulate in the input's dtype, float32 or wider,
    also under bfloat16 autocast. Half-precision channels-last inputs are normalised by
    ``F.group_norm`` with float32 statistics.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    @classmethod
    def replacing(cls, norm: nn.InstanceNorm3d) -> "LayoutAwareInstanceNorm3d":
        if not replaceable_instance_norm(norm):
            raise ValueError(f"{norm}: only instance norms without affine parameters or running statistics")
        return cls(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return F.instance_norm(x, eps=self.eps)
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype in (torch.bfloat16, torch.float16):
                # The activations hold about 3 significant digits, so ATen's float32 statistics
                # are exact to well within what the output can store, and its channels-last
                # kernel took 0.03 s against 0.21 s for the float64 partial sums below on a
                # 96^3 x 48 window (2 AVX-512 cores): most of the time of --fast's network.
                return F.group_norm(x, x.shape[1], eps=self.eps)
            return self._channels_last(x)

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *sizes = x.shape
        voxels = x[0, 0].numel()
        work_dtype = torch.promote_types(x.dtype, torch.float32)
        flat = x.permute(0, 2, 3, 4, 1).reshape(batch, voxels, channels).to(work_dtype)
        # Corrected two-pass statistics: deviations from a first estimate of the mean are
        # small, so their sums stay accurate even where the mean is large against the spread.
        deviations = flat - (_column_sums(flat) / voxels).to(work_dtype)
        correction = _column_sums(deviations) / voxels
        variance = (_column_sums(deviations, squared=True) / voxels - correction.square()).clamp_min(0)
        scale = torch.rsqrt(variance + self.eps)
        normalised = torch.addcmul((-correction * scale).to(work_dtype), deviations, scale.to(work_dtype), out=deviations)
        return normalised.to(x.dtype).view(batch, *sizes, channels).permute(0, 4, 1, 2, 3)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
