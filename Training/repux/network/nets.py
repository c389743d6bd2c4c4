"""RepUX-Net and 3D UX-Net: the hierarchical encoder with a UNETR-style MONAI decoder.

Both load the published ``best_metric_model.pth`` state_dicts strictly, with the same keys,
shapes and outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from ..errors import InputError
from .blocks import RepUXBlock, UXBlock
from .encoder import HierarchicalEncoder

__all__ = ["SPATIAL_MULTIPLE", "RepUXNet", "UXNet"]

SPATIAL_MULTIPLE = 16
"""Every spatial side of a network input must be a multiple of this (four halvings)."""


def _positive_ints(name: str, value: Any, count: int | None = None) -> list[int]:
    values = [value] if count is None else value
    ok = isinstance(values, (list, tuple)) and (count is None or len(values) == count)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        expected = "a positive integer" if count is None else f"{count} positive integers"
        raise InputError(f"network argument {name}={value!r}: expected {expected}")
    return list(values)


class _EncoderDecoderNet(nn.Module):
    """Encoder skips -> MONAI UNETR blocks -> logits; subclasses provide the encoder.

    The decoder, as published: ``encoder1`` on the raw input, ``encoder2..4`` on skips 0..2,
    ``encoder5`` on skip 3 (to ``hidden_size``); ``decoder5..2`` upsample (transposed conv,
    kernel 2, stride 2) and merge with encoder5..1's outputs; ``decoder1`` and ``out`` (1^3 conv)
    at full resolution. MONAI's blocks: convs without bias, instance norm without affine
    (for ``norm_name="instance"``), LeakyReLU 0.01.
    """

    arch: str = ""
    encoder_name: str = ""

    def __init__(
        self,
        encoder: nn.Module,
        in_chans: int,
        out_chans: int,
        feat_size: Sequence[int],
        hidden_size: int,
        norm_name: str | tuple,
        res_block: bool,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        # The encoder first, then the blocks in the order of the published state_dict.
        self.add_module(self.encoder_name, encoder)
        f0, f1, f2, f3 = feat_size
        dims = 3

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(dims, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                dims, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block
            )

        self.encoder1 = basic(in_chans, f0)
        self.encoder2 = basic(f0, f1)
        self.encoder3 = basic(f1, f2)
        self.encoder4 = basic(f2, f3)
        self.encoder5 = basic(f3, hidden_size)
        self.decoder5 = up(hidden_size, f3)
        self.decoder4 = up(f3, f2)
        self.decoder3 = up(f2, f1)
        self.decoder2 = up(f1, f0)
        self.decoder1 = basic(f0, f0)
        self.out = UnetOutBlock(dims, f0, out_chans)

    @property
    def encoder(self) -> HierarchicalEncoder:
        """The hierarchical encoder (``repuxnet_3d`` or ``uxnet_3d``)."""
        return getattr(self, self.encoder_name)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``InputError`` unless ``x`` is (B, in_chans, D, H, W) with sides multiples of 16."""
        shape = tuple(x.shape)
        name = type(self).__name__
        if x.ndim != 5 or shape[1] != self.in_chans:
            raise InputError(
                f"{name} input of shape {shape}: expected (B, {self.in_chans}, D, H, W), "
                f"i.e. 5 dimensions with {self.in_chans} channel(s) in dimension 1"
            )
        if any(side % SPATIAL_MULTIPLE for side in shape[2:]):
            raise InputError(
                f"{name} input of shape {shape}: spatial sides {shape[2:]} must be multiples of "
                f"{SPATIAL_MULTIPLE} (pad the volume or choose such a patch size)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> logits (B, out_chans, D, H, W); D, H, W multiples of 16."""
        self.check_input(x)
        skip0, skip1, skip2, skip3 = self.encoder(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(skip0)
        enc3 = self.encoder3(skip1)
        enc4 = self.encoder4(skip2)
        enc5 = self.encoder5(skip3)
        dec = self.decoder5(enc5, enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(self.decoder1(dec))


def _common_config(
    in_chans: Any,
    out_chans: Any,
    depths: Any,
    feat_size: Any,
    hidden_size: Any,
    norm_name: Any,
    res_block: Any,
    spatial_dims: Any,
) -> dict[str, Any]:
    if spatial_dims != 3:
        raise InputError(f"network argument spatial_dims={spatial_dims!r}: only 3 is supported")
    if not isinstance(res_block, bool):
        raise InputError(f"network argument res_block={res_block!r}: expected true or false")
    if not isinstance(norm_name, (str, list, tuple)) or not norm_name:
        raise InputError(f"network argument norm_name={norm_name!r}: expected a MONAI norm name such as 'instance'")
    return {
        "in_chans": _positive_ints("in_chans", in_chans)[0],
        "out_chans": _positive_ints("out_chans", out_chans)[0],
        "depths": _positive_ints("depths", depths, 4),
        "feat_size": _positive_ints("feat_size", feat_size, 4),
        "hidden_size": _positive_ints("hidden_size", hidden_size)[0],
        # A (name, args) pair arrives as a list from JSON; MONAI wants a tuple.
        "norm_name": norm_name if isinstance(norm_name, str) else list(norm_name),
        "res_block": res_block,
        "spatial_dims": 3,
    }


def _monai_norm(norm_name: str | list) -> str | tuple:
    return norm_name if isinstance(norm_name, str) else tuple(norm_name)


class RepUXNet(_EncoderDecoderNet):
    """RepUX-Net (MICCAI 2023): 3D UX-Net with ``ks``^3 depthwise kernels and no block MLP.

    Encoder blocks are :class:`RepUXBlock`. The Bayesian frequency prior with ``a`` is not part
    of the forward pass: it is stored as ``prior_alpha`` for the optimizer (``repux.bfr``).

    Args:
        in_chans: image channels.
        out_chans: classes, background included.
        depths: blocks per stage.
        feat_size: stage widths.
        ks: side of the large depthwise kernels (odd).
        a: the prior's alpha, m = a / (d + a) at distance d voxels from the kernel centre.
        hidden_size: width of the bottleneck (``encoder5``).
        norm_name: MONAI norm of the decoder blocks.
        res_block: residual decoder blocks.
        spatial_dims: must be 3.

    Forward: (B, in_chans, D, H, W) -> logits (B, out_chans, D, H, W), sides multiples of 16.
    """

    arch = "repuxnet"
    encoder_name = "repuxnet_3d"

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        ks: int = 21,
        a: float = 1.0,
        hidden_size: int = 768,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        spatial_dims: int = 3,
    ) -> None:
        config = _common_config(in_chans, out_chans, depths, feat_size, hidden_size, norm_name, res_block, spatial_dims)
        kernel = _positive_ints("ks", ks)[0]
        if kernel % 2 == 0:
            raise InputError(f"network argument ks={ks!r}: expected an odd kernel size (so that sizes are kept)")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
            raise InputError(f"network argument a={a!r}: expected a positive number (the prior's alpha)")
        encoder = HierarchicalEncoder(
            config["in_chans"], config["depths"], config["feat_size"], lambda width: RepUXBlock(width, kernel)
        )
        super().__init__(
            encoder,
            config["in_chans"],
            config["out_chans"],
            config["feat_size"],
            config["hidden_size"],
            _monai_norm(config["norm_name"]),
            config["res_block"],
        )
        self.prior_alpha = float(a)
        # In constructor order, so that model.json reads like the call.
        self.config: dict[str, Any] = {"arch": self.arch}
        for key, value in config.items():
            self.config[key] = value
            if key == "feat_size":
                self.config.update(ks=kernel, a=float(a))


class UXNet(_EncoderDecoderNet):
    """3D UX-Net (ICLR 2023): 7^3 depthwise kernels with a grouped pointwise MLP and residual.

    Encoder blocks are :class:`UXBlock`. Arguments as :class:`RepUXNet` without ``ks`` and ``a``.

    Forward: (B, in_chans, D, H, W) -> logits (B, out_chans, D, H, W), sides multiples of 16.
    """

    arch = "uxnet"
    encoder_name = "uxnet_3d"

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        hidden_size: int = 768,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        spatial_dims: int = 3,
    ) -> None:
        config = _common_config(in_chans, out_chans, depths, feat_size, hidden_size, norm_name, res_block, spatial_dims)
        encoder = HierarchicalEncoder(config["in_chans"], config["depths"], config["feat_size"], UXBlock)
        super().__init__(
            encoder,
            config["in_chans"],
            config["out_chans"],
            config["feat_size"],
            config["hidden_size"],
            _monai_norm(config["norm_name"]),
            config["res_block"],
        )
        self.config: dict[str, Any] = {"arch": self.arch, **config}
