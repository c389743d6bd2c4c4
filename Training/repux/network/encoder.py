"""The four-stage hierarchical encoder shared by RepUX-Net and 3D UX-Net."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .blocks import ChannelsFirstLayerNorm

__all__ = ["HierarchicalEncoder"]


class HierarchicalEncoder(nn.Module):
    """Stem, three downsamplings and four stages of blocks, with a normalised skip per stage.

    - ``downsample_layers.0`` (stem): Conv3d(in_chans, feat_size[0], 7, stride 2, padding 3)
      then a channels-first LayerNorm;
    - ``downsample_layers.1..3``: channels-first LayerNorm then Conv3d(kernel 2, stride 2);
    - ``stages.s``: ``depths[s]`` blocks of width ``feat_size[s]``;
    - ``norm{s}``: channels-first LayerNorm of the output of stage s, returned as skip s, while
      the un-normalised tensor goes on to the next downsampling.

    Args:
        in_chans: input channels.
        depths: blocks per stage (4 values).
        feat_size: stage widths (4 values).
        make_block: ``make_block(channels) -> nn.Module`` builds one block.

    Forward: (B, in_chans, D, H, W) -> 4 skips, skip s of shape
    (B, feat_size[s], D / 2^(s+1), H / 2^(s+1), W / 2^(s+1)).
    """

    def __init__(
        self,
        in_chans: int,
        depths: Sequence[int],
        feat_size: Sequence[int],
        make_block: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        stem = nn.Sequential(
            nn.Conv3d(in_chans, feat_size[0], kernel_size=7, stride=2, padding=3),
            ChannelsFirstLayerNorm(feat_size[0], eps=1e-6),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for narrow, wide in zip(feat_size[:-1], feat_size[1:]):
            self.downsample_layers.append(
                nn.Sequential(
                    ChannelsFirstLayerNorm(narrow, eps=1e-6),
                    nn.Conv3d(narrow, wide, kernel_size=2, stride=2),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(make_block(width) for _ in range(depth))) for depth, width in zip(depths, feat_size)
        )
        # Registered after the stages so the state_dict order is that of the published code.
        for stage, width in enumerate(feat_size):
            self.add_module(f"norm{stage}", ChannelsFirstLayerNorm(width, eps=1e-6))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage, (downsample, blocks) in enumerate(zip(self.downsample_layers, self.stages)):
            x = blocks(downsample(x))
            skips.append(getattr(self, f"norm{stage}")(x))
        return skips
