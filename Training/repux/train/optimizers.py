"""The update rules ``--optimizer`` selects, and the start each needs for a fresh network.

- ``bfr-adamw``: :class:`repux.bfr.BFRAdamW` with the frequency prior on the large kernels
  (the paper's method: the kernels train as W = m * V with V updated by AdamW).
- ``adamw``: ``torch.optim.AdamW`` on every parameter, the same large kernels without the
  prior (ablation).
- ``frozen-kernels``: what the published code does in effect. Its block replaces the
  kernel on every forward pass with a detached copy of ``weight * m``, so the optimizer
  never updates the kernel, and after n forward passes (validation windows included) the
  kernel is its initial value times m^n. Emulated exactly: the large kernels leave the
  optimizer (``requires_grad`` False) and a forward pre-hook multiplies them by m in place
  before every forward pass. Everything else trains with AdamW. For comparisons only.

A fresh network starts from the same raw initial weights V0 under every rule; the
re-parameterized rules (``bfr-adamw``) and ``adamw`` start from W0 = m * V0
(:func:`repux.bfr.init_kernels_with_prior`), ``frozen-kernels`` from V0, whose first forward
pass then uses m * V0 as well: all three see the same kernel at the first step.
"""

from __future__ import annotations

import torch
from torch import nn

from repux.bfr import BFRAdamW, bfr_param_groups, frequency_prior, init_kernels_with_prior
from repux.network import large_kernel_convs


def network_alpha(network: nn.Module) -> float:
    """The prior's alpha a network was built with (``config["a"]``), 1.0 when it has none."""
    return float(getattr(network, "config", {}).get("a", 1.0))


def prepare_fresh_network(network: nn.Module, optimizer: str, alpha: float) -> None:
    """Give a freshly initialised network the start its update rule expects (see the module doc)."""
    if optimizer != "frozen-kernels" and large_kernel_convs(network):
        init_kernels_with_prior(network, alpha)


def freeze_kernels_like_published_code(network: nn.Module, alpha: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Emulate the published code's large kernels: never trained, multiplied by m on each forward pass.

    Returns:
        The hook handles (remove them to stop the multiplication).
    """
    handles = []
    for _, conv in large_kernel_convs(network):
        conv.weight.requires_grad_(False)
        prior = frequency_prior(conv.weight.shape[-1], alpha, dtype=torch.float64)

        def multiply(module: nn.Module, _inputs: tuple, prior: torch.Tensor = prior) -> None:
            with torch.no_grad():
                module.weight.mul_(prior.to(device=module.weight.device, dtype=module.weight.dtype))

        handles.append(conv.register_forward_pre_hook(multiply))
    return handles


def make_optimizer(
    network: nn.Module, optimizer: str, lr: float = 1e-4, weight_decay: float = 0.01, alpha: float = 1.0
) -> torch.optim.Optimizer:
    """The optimizer of rule ``optimizer`` for ``network`` (on its final device).

    ``frozen-kernels`` also installs its hooks on ``network`` (see the module docstring).
    """
    if optimizer == "bfr-adamw":
        return BFRAdamW(bfr_param_groups(network, alpha, weight_decay=weight_decay), lr=lr, weight_decay=weight_decay)
    if optimizer == "frozen-kernels":
        freeze_kernels_like_published_code(network, alpha)
    params = [p for p in network.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
