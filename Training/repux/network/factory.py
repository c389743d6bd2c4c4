"""Networks by name: building from a config, presets, and configs read off a state_dict."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .nets import RepUXNet, UXNet

__all__ = ["ARCHITECTURES", "NETWORK_PRESETS", "build_network", "config_from_state_dict"]

ARCHITECTURES: dict[str, type[nn.Module]] = {"repuxnet": RepUXNet, "uxnet": UXNet}

NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    # The published RepUX-Net (65.8M parameters at 13 classes).
    "paper": {
        "arch": "repuxnet",
        "depths": [2, 2, 2, 2],
        "feat_size": [48, 96, 192, 384],
        "ks": 21,
        "a": 1.0,
        "hidden_size": 768,
    },
    # A RepUX-Net with the paper's 21^3 kernels and width ratios that trains on a CPU and
    # ships in the repository: 1.94M parameters (7.8 MB in fp32) at 5 classes, of which the
    # large kernels are three quarters. Stage widths up to 64 would cost 14.7 MB.
    "small": {
        "arch": "repuxnet",
        "depths": [2, 2, 2, 2],
        "feat_size": [8, 16, 24, 32],
        "ks": 21,
        "a": 1.0,
        "hidden_size": 64,
    },
}
"""Widths of named networks. ``in_chans``/``out_chans`` come from the data:
``build_network(preset["arch"], **preset, out_chans=5)``."""


def _check_arch(arch: str) -> type[nn.Module]:
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown network architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def build_network(arch: str, /, **config: Any) -> nn.Module:
    """Build ``ARCHITECTURES[arch](**config)``.

    ``config`` may be a network's ``.config`` (its ``"arch"`` entry must then equal ``arch``).
    Unknown architectures or arguments raise ``InputError`` naming the accepted ones.
    """
    cls = _check_arch(arch)
    config = dict(config)
    config_arch = config.pop("arch", arch)
    if config_arch != arch:
        raise InputError(f"network config says arch={config_arch!r} but {arch!r} was asked for")
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise InputError(
            f"network argument(s) {', '.join(unknown)} not accepted by {arch}: expected some of {', '.join(accepted)}"
        )
    return cls(**config)


def config_from_state_dict(arch: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The config of the network that ``state_dict`` belongs to, inferred from tensor shapes.

    Works on the raw published ``best_metric_model.pth`` dicts (and on ours: the keys are the
    same). Infers ``in_chans``, ``out_chans``, ``depths``, ``feat_size``, ``ks`` (RepUX-Net),
    ``hidden_size`` and ``res_block``; ``a`` is not stored in weights and gets its default.
    The result has the form of a network's ``.config`` and is checked by building that network
    (on the meta device) and comparing every key and shape.

    Raises:
        InputError: unknown ``arch`` or keys/shapes that no such network has.
    """
    cls = _check_arch(arch)
    prefix = f"{cls.encoder_name}."
    keys = list(state_dict)
    if not any(key.startswith(prefix) for key in keys):
        hint = f"no key starts with {prefix!r}"
        if keys and all(key.startswith("module.") for key in keys):
            hint += " (every key starts with 'module.': strip the DistributedDataParallel prefix first)"
        for other, other_cls in ARCHITECTURES.items():
            if other != arch and any(key.startswith(f"{other_cls.encoder_name}.") for key in keys):
                hint += f" (the keys are those of a {other} network)"
        raise InputError(f"state_dict is not a {arch} network: {hint}")

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise InputError(f"state_dict is not a {arch} network: key {key!r} is missing")
        return tuple(state_dict[key].shape)

    stem = shape(f"{prefix}downsample_layers.0.0.weight")
    feat_size = [stem[0]] + [shape(f"{prefix}downsample_layers.{i}.1.weight")[0] for i in (1, 2, 3)]
    block_pattern = re.compile(rf"^{re.escape(prefix)}stages\.(\d+)\.(\d+)\.dwconv\.weight$")
    blocks: dict[int, set[int]] = {0: set(), 1: set(), 2: set(), 3: set()}
    for key in keys:
        match = block_pattern.match(key)
        if match and int(match.group(1)) in blocks:
            blocks[int(match.group(1))].add(int(match.group(2)))
    config: dict[str, Any] = {
        "arch": arch,
        "in_chans": stem[1],
        "out_chans": shape("out.conv.conv.weight")[0],
        "depths": [len(blocks[stage]) for stage in range(4)],
        "feat_size": feat_size,
    }
    kernel = shape(f"{prefix}stages.0.0.dwconv.weight")[-1]
    if arch == "repuxnet":
        config.update(ks=kernel, a=1.0)
    elif kernel != 7:
        raise InputError(f"state_dict has {kernel}^3 depthwise kernels: a {arch} network has 7^3")
    config.update(
        hidden_size=shape("encoder5.layer.conv1.conv.weight")[0],
        norm_name="instance",
        # Residual MONAI blocks carry a 1^3 projection wherever the width changes.
        res_block="decoder5.conv_block.conv3.conv.weight" in state_dict,
        spatial_dims=3,
    )

    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in build_network(arch, **config).state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    problems = [f"missing {key}" for key in expected if key not in found]
    problems += [f"unexpected {key}" for key in found if key not in expected]
    problems += [
        f"{key} has shape {list(found[key])}, expected {list(expected[key])}"
        for key in expected
        if key in found and found[key] != expected[key]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"state_dict does not match a {arch} network with {config}: {shown}")
    return config
