"""Parameter groups and initialisation that put a RepUX-Net's large kernels under the frequency prior."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from repux.bfr.prior import check_alpha, frequency_prior
from repux.errors import InputError

__all__ = ["bfr_param_groups", "init_kernels_with_prior"]

KernelList = Sequence[tuple[str, nn.Conv3d]]


def _network_alpha(model: nn.Module) -> float:
    """The prior's alpha the network was built with (its ``config["a"]``), else 1.0."""
    # DistributedDataParallel and torch.compile wrap the network as .module / ._orig_mod.
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        config = getattr(candidate, "config", None)
        if isinstance(config, dict) and "a" in config:
            return check_alpha(config["a"], "the network's config['a']")
    return 1.0


def _large_kernels(model: nn.Module, kernels: KernelList | None) -> list[tuple[str, nn.Conv3d]]:
    if kernels is None:
        # Imported here: repux.network may itself use this package, and only this needs it.
        from repux.network import large_kernel_convs

        kernels = large_kernel_convs(model)
    kernels = list(kernels)
    if not kernels:
        raise InputError(
            f"{type(model).__name__} has no large depthwise kernels to put under the frequency prior "
            "(expected a RepUX-Net, or pass kernels=[(name, conv), ...])"
        )
    for name, conv in kernels:
        weight = getattr(conv, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        if (
            not isinstance(conv, nn.Conv3d)
            or shape is None
            or len(shape) != 5
            or shape[1] != 1
            or conv.groups != conv.in_channels
            or not shape[2] == shape[3] == shape[4]
            or shape[2] % 2 == 0
        ):
            raise InputError(
                f"kernel {name!r}: expected a depthwise Conv3d with a cubic odd kernel, weight (C, 1, k, k, k), "
                f"got {type(conv).__name__} with weight shape {shape}"
            )
    return kernels


def bfr_param_groups(
    model: nn.Module,
    alpha: float | None = None,
    weight_decay: float = 0.01,
    *,
    no_decay_for_1d: bool = False,
    kernels: KernelList | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`~repux.bfr.BFRAdamW` / :class:`~repux.bfr.BFRSGD`.

    The large depthwise kernels get the frequency prior (one group per kernel size); their
    biases and every other trainable parameter go in a plain group. Like the paper's
    training code, every parameter gets the same weight decay by default; with
    ``no_decay_for_1d`` the 1-D parameters (biases, normalisation scales and shifts, UX-Net's
    layer scale) get none, a common alternative. Frozen parameters are left out.

    Args:
        model: the network (a RepUX-Net; DDP / torch.compile wrappers are fine).
        alpha: the prior's alpha; default the network's own ``config["a"]``, else 1.0.
        weight_decay: weight decay of every group (but the 1-D one with ``no_decay_for_1d``).
        no_decay_for_1d: put 1-D parameters in a group without weight decay.
        kernels: ``[(name, conv), ...]`` to re-parameterize; default
            ``repux.network.large_kernel_convs(model)``.

    Returns:
        A list of dicts with ``"params"``, ``"weight_decay"``, ``"name"`` and, for the kernels,
        ``"prior"``: a float64 (k, k, k) tensor on the CPU (the optimizer moves it once).
    """
    alpha = _network_alpha(model) if alpha is None else check_alpha(alpha)
    kernels = _large_kernels(model, kernels)
    owned: set[int] = set()
    groups: list[dict[str, Any]] = []
    by_size: dict[int, list[nn.Parameter]] = {}
    for _, conv in kernels:
        if conv.weight.requires_grad and id(conv.weight) not in owned:
            owned.add(id(conv.weight))
            by_size.setdefault(conv.weight.shape[-1], []).append(conv.weight)
    for size, weights in by_size.items():
        groups.append(
            {
                "params": weights,
                "prior": frequency_prior(size, alpha, dtype=torch.float64),
                "weight_decay": weight_decay,
                "name": f"large_kernels_{size}",
            }
        )
    decayed, not_decayed = [], []
    for param in model.parameters():
        if not param.requires_grad or id(param) in owned:
            continue
        owned.add(id(param))
        (not_decayed if no_decay_for_1d and param.ndim <= 1 else decayed).append(param)
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay, "name": "other"})
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0, "name": "no_decay_1d"})
    return groups


@torch.no_grad()
def init_kernels_with_prior(
    model: nn.Module, alpha: float | None = None, *, kernels: KernelList | None = None
) -> list[str]:
    """Multiply the large kernels by the prior: W0 = m * V0, V0 being their current (initial) values.

    Call it once, on a freshly built network, before training with a prior group: the run
    then equals training the latent V from PyTorch's default initialisation, step 0
    included. Do not call it on trained or imported weights (fine-tuning starts from the
    stored W, i.e. from V = W / m) and do not call it twice (that would apply m^2).

    Args:
        model: the network.
        alpha: the prior's alpha; default the network's own ``config["a"]``, else 1.0.
        kernels: as in :func:`bfr_param_groups`.

    Returns:
        The names of the kernels that were scaled.
    """
    alpha = _network_alpha(model) if alpha is None else check_alpha(alpha)
    kernels = _large_kernels(model, kernels)
    for _, conv in kernels:
        prior = frequency_prior(conv.weight.shape[-1], alpha, dtype=torch.float64)
        conv.weight.mul_(prior.to(device=conv.weight.device, dtype=conv.weight.dtype))
    return [name for name, _ in kernels]
