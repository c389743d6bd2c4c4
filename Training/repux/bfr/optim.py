"""AdamW and SGD that train a kernel W exactly as if they trained a latent V with W = m * V.

A parameter group may carry ``"prior"``: a tensor m (> 0) that broadcasts to each of its
parameters without enlarging them (a (k, k, k) frequency prior for (C, 1, k, k, k) depthwise
kernels). Those parameters follow, step by step, the trajectory that the plain optimizer
would give ``W = m * V`` if it trained V (weight decay, momentum, dampening, nesterov and
eps included), while the model keeps holding W, so a checkpoint is a plain state_dict. The
optimizer state lives in W-space: BFRAdamW stores the moments of dL/dW, with the layout of
``torch.optim.AdamW``; BFRSGD stores a momentum buffer that is m times the latent one.
Groups without a prior behave exactly as ``torch.optim.AdamW`` / ``torch.optim.SGD``.
The derivation is in ``docs/bfr.md``:

- AdamW: the step is ``-lr/bc1 * exp_avg / D`` with ``D = sqrt(exp_avg_sq) / (m sqrt(bc2))
  + eps / m^2`` where plain AdamW has ``sqrt(exp_avg_sq) / sqrt(bc2) + eps``;
- SGD: plain SGD on W with the gradient ``m^2 * dL/dW`` in place of ``dL/dW``.

The prior is read (and moved to each parameter's device and dtype) once and cached; to
change it, assign a new tensor to ``group["prior"]`` rather than editing it in place.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from repux.errors import InputError

__all__ = ["BFRAdamW", "BFRSGD"]

# Options of torch's optimizers that these classes do not implement; a parameter group (or a
# loaded state) that switches one on is refused rather than silently ignored.
_UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable", "fused")


def _check_number(value: object, name: str, where: str, *, low: float = 0.0, below: float | None = None) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if ok and below is not None:
        ok = value < below
    if not ok:
        bounds = f">= {low}" if below is None else f"in [{low}, {below})"
        raise InputError(f"{where}: {name} must be a finite number {bounds}, got {value!r}")


def _scalar_dtype() -> torch.dtype:
    # The dtype torch's own optimizers give their step counters, so that states interchange.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit a foreach kernel runs on."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        buckets.setdefault((tensor.device, tensor.dtype), []).append(index)
    return buckets


class _PriorGroupsOptimizer(torch.optim.Optimizer):
    """Validation of parameter groups and their priors, and the per-device factors of each prior."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._factor_cache: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, tuple, tuple[Tensor, ...]]] = {}
        self._check_hyperparameters(defaults, type(self).__name__)
        super().__init__(params, defaults)

    # -- hooks for the two optimizers -------------------------------------------------
    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _factor_inputs(self, group: dict[str, Any]) -> tuple:
        """Group settings besides the prior that the cached factors depend on."""
        return ()

    def _factors_from_prior(self, prior: Tensor, group: dict[str, Any]) -> tuple[Tensor, ...]:
        """Per-element factors of the update, from the prior in float64."""
        raise NotImplementedError

    # -- groups -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise InputError(f"{type(self).__name__}: a parameter group needs a 'params' entry")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, Tensor):
            group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters must be an ordered collection (the order keys the state), not a set")
        else:
            group["params"] = list(params)
        if group.get("prior") is not None:
            group["prior"] = group["prior"].detach() if isinstance(group["prior"], Tensor) else group["prior"]
        self._check_group({**self.defaults, **group}, f"{type(self).__name__} parameter group {len(self.param_groups)}")
        super().add_param_group(group)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        self._check_hyperparameters(group, where)
        for option in _UNSUPPORTED_OPTIONS:
            if group.get(option):
                raise InputError(f"{where}: option {option}={group[option]!r} is not supported (only False)")
        for param in group["params"]:
            if isinstance(param, Tensor) and param.is_complex():
                raise InputError(f"{where}: complex parameters are not supported (one has shape {tuple(param.shape)})")
        if group.get("prior") is not None:
            _check_prior(group["prior"], group["params"], where)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``; the saved hyperparameters and priors replace the current ones.

        Raises:
            InputError: a group has a prior here but not in the saved state, or the other way
                round (a state saved from another optimizer or other groups), or a saved prior
                does not fit this group's parameters.
        """
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved_groups, list) and len(saved_groups) == len(self.param_groups):
            for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
                where = f"{type(self).__name__}.load_state_dict: parameter group {index}"
                has_prior, saved_prior = group.get("prior") is not None, saved.get("prior") is not None
                if has_prior != saved_prior:
                    raise InputError(
                        f"{where} {'has a' if has_prior else 'has no'} frequency prior but the saved state "
                        f"{'has none' if has_prior else 'has one'}: the state was saved from another optimizer "
                        "or with other parameter groups"
                    )
                self._check_group({**self.defaults, **saved, "params": group["params"]}, where)
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Factors derive from the priors, which a loaded state replaces: rebuild them lazily.
        self._factor_cache = {}

    def _prior_factors(self, group: dict[str, Any], like: Tensor) -> tuple[Tensor, ...]:
        """The group's prior factors on ``like``'s device and dtype, computed once in float64."""
        prior = group["prior"]
        key = (id(prior), like.device, like.dtype)
        inputs = self._factor_inputs(group)
        entry = self._factor_cache.get(key)
        if entry is None or entry[0] is not prior or entry[1] != inputs:
            # Drop the factors of priors no group holds any more (replaced by the user).
            live = {id(g.get("prior")) for g in self.param_groups}
            for stale in [k for k in self._factor_cache if k[0] not in live]:
                del self._factor_cache[stale]
            exact = prior.detach().to(dtype=torch.float64)
            factors = tuple(f.to(device=like.device, dtype=like.dtype) for f in self._factors_from_prior(exact, group))
            entry = (prior, inputs, factors)
            self._factor_cache[key] = entry
        return entry[2]


def _check_prior(prior: object, params: list[Any], where: str) -> None:
    if not isinstance(prior, Tensor) or not prior.is_floating_point():
        raise InputError(f"{where}: prior must be a real floating-point torch.Tensor, got {prior!r:.80}")
    if prior.numel() == 0 or not bool(torch.isfinite(prior).all()) or not bool((prior > 0).all()):
        low = prior.min().item() if prior.numel() else "empty"
        raise InputError(
            f"{where}: every element of the prior must be finite and > 0 (the latent kernel is W / prior), "
            f"got min {low}"
        )
    for param in params:
        try:
            shape = torch.broadcast_shapes(prior.shape, param.shape)
        except RuntimeError:
            shape = None
        if shape != param.shape:
            raise InputError(
                f"{where}: prior of shape {tuple(prior.shape)} does not broadcast to a parameter of shape "
                f"{tuple(param.shape)} (expected e.g. (k, k, k) for a (C, 1, k, k, k) kernel)"
            )


class BFRAdamW(_PriorGroupsOptimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) with frequency re-parameterized groups.

    A group with ``"prior": m`` trains its parameters W exactly as ``torch.optim.AdamW``
    would train V with W = m * V: the step is scaled by m and eps by 1/m (docs/bfr.md).

    Args:
        params: parameters or parameter groups (dicts; optional key ``"prior"``).
        lr: learning rate (1e-4, the paper's).
        betas: decay rates of the first and second moments, each in [0, 1).
        eps: added to the root of the second moment (in V-space for prior groups).
        weight_decay: decoupled weight decay per step, relative (0.01, the paper's).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, prior=None)
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        _check_number(group["lr"], "lr", where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise InputError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
        for index, beta in enumerate(betas):
            _check_number(beta, f"betas[{index}]", where, below=1.0)
        _check_number(group["eps"], "eps", where)
        _check_number(group["weight_decay"], "weight_decay", where)
        if group.get("decoupled_weight_decay", True) is not True:
            raise InputError(f"{where}: only decoupled weight decay (AdamW) is supported, not Adam's L2 form")

    def _factor_inputs(self, group: dict[str, Any]) -> tuple:
        return (group["eps"],)

    def _factors_from_prior(self, prior: Tensor, group: dict[str, Any]) -> tuple[Tensor, ...]:
        return 1.0 / prior, group["eps"] / (prior * prior)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("BFRAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                params.append(param)
                grads.append(param.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            # .get: a state saved by torch's own optimizer has no "prior" key.
            if group.get("prior") is None:
                self._plain_update(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            else:
                self._prior_update(group, params, grads, exp_avgs, exp_avg_sqs, steps)
        return loss

    @staticmethod
    def _plain_update(group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        # The operations (and their order) of torch.optim.AdamW, so results agree bit for bit.
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for indices in _by_device_and_dtype(params).values():
            device_params = [params[i] for i in indices]
            device_grads = [grads[i] for i in indices]
            device_exp_avgs = [exp_avgs[i] for i in indices]
            device_exp_avg_sqs = [exp_avg_sqs[i] for i in indices]
            counts = []
            for i in indices:
                steps[i] += 1
                counts.append(steps[i].item())
            if weight_decay != 0:
                torch._foreach_mul_(device_params, 1 - lr * weight_decay)
            torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
            torch._foreach_mul_(device_exp_avg_sqs, beta2)
            torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
            step_sizes = [(lr / (1 - beta1**count)) * -1 for count in counts]
            bias_correction2_sqrts = [(1 - beta2**count) ** 0.5 for count in counts]
            denominators = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_div_(denominators, bias_correction2_sqrts)
            torch._foreach_add_(denominators, eps)
            torch._foreach_addcdiv_(device_params, device_exp_avgs, denominators, step_sizes)

    def _prior_update(self, group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        # Few, large tensors (the large kernels): a loop with broadcasting factors, no foreach.
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            inverse_prior, eps_over_prior_sq = self._prior_factors(group, param)
            step += 1
            count = step.item()
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # AdamW's denominator in V-space, m sqrt(v)/sqrt(bc2) + eps, divided by m^2: the
            # latent step times m, as one denominator (one pass, no extra buffer).
            denominator = exp_avg_sq.sqrt()
            torch.addcmul(
                eps_over_prior_sq, denominator, inverse_prior, value=1 / (1 - beta2**count) ** 0.5, out=denominator
            )
            param.addcdiv_(exp_avg, denominator, value=-(lr / (1 - beta1**count)))


class BFRSGD(_PriorGroupsOptimizer):
    """SGD (momentum, dampening, nesterov and weight decay as ``torch.optim.SGD``) with prior groups.

    A group with ``"prior": m`` trains its parameters W exactly as ``torch.optim.SGD`` would
    train V with W = m * V: that is SGD on W with the gradient ``m^2 * dL/dW`` (docs/bfr.md).

    Args:
        params: parameters or parameter groups (dicts; optional key ``"prior"``).
        lr: learning rate.
        momentum: momentum factor (0 = none).
        dampening: dampening of the momentum (must be 0 with nesterov).
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, prior=None
        )
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        _check_number(group["lr"], "lr", where)
        _check_number(group["momentum"], "momentum", where)
        _check_number(group["dampening"], "dampening", where, low=-math.inf)
        _check_number(group["weight_decay"], "weight_decay", where)
        if not isinstance(group["nesterov"], bool):
            raise InputError(f"{where}: nesterov must be True or False, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise InputError(
                f"{where}: nesterov needs momentum > 0 and dampening 0, got momentum {group['momentum']} "
                f"and dampening {group['dampening']}"
            )

    def _factors_from_prior(self, prior: Tensor, group: dict[str, Any]) -> tuple[Tensor, ...]:
        return (prior * prior,)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("BFRSGD does not support sparse gradients")
            if not params:
                continue
            if group.get("prior") is None:
                self._plain_update(group, params)
            else:
                self._prior_update(group, params)
        return loss

    def _plain_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # The operations (and their order) of torch.optim.SGD, so results agree bit for bit;
        # unlike torch's foreach path it never writes into .grad.
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        weight_decay, nesterov = group["weight_decay"], group["nesterov"]
        for indices in _by_device_and_dtype(params).values():
            device_params = [params[i] for i in indices]
            device_grads = [params[i].grad for i in indices]
            if weight_decay != 0:
                device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
            if momentum != 0:
                states = [self.state[p] for p in device_params]
                # torch's own SGD may have saved a None buffer (momentum 0 at the time).
                if all(state.get("momentum_buffer") is not None for state in states):
                    buffers = [state["momentum_buffer"] for state in states]
                    torch._foreach_mul_(buffers, momentum)
                    torch._foreach_add_(buffers, device_grads, alpha=1 - dampening)
                else:
                    buffers = []
                    for state, grad in zip(states, device_grads):
                        if state.get("momentum_buffer") is None:
                            state["momentum_buffer"] = grad.detach().clone()
                        else:
                            state["momentum_buffer"].mul_(momentum).add_(grad, alpha=1 - dampening)
                        buffers.append(state["momentum_buffer"])
                if nesterov:
                    device_grads = torch._foreach_add(device_grads, buffers, alpha=momentum)
                else:
                    device_grads = buffers
            torch._foreach_add_(device_params, device_grads, alpha=-lr)

    def _prior_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        weight_decay, nesterov = group["weight_decay"], group["nesterov"]
        for param in params:
            (prior_sq,) = self._prior_factors(group, param)
            # The latent gradient m g + wd V, times m: m^2 g + wd W. Momentum is linear, so the
            # buffer is kept times m as well and every later line is torch's SGD unchanged.
            direction = param.grad * prior_sq
            if weight_decay != 0:
                direction.add_(param, alpha=weight_decay)
            if momentum != 0:
                state = self.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = direction.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(direction, alpha=1 - dampening)
                buffer = state["momentum_buffer"]
                if nesterov:
                    direction.add_(buffer, alpha=momentum)
                else:
                    direction = buffer
            param.add_(direction, alpha=-lr)
