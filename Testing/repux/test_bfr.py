"""repux.bfr: the frequency prior, and optimizers that equal training a latent kernel V with W = m * V.

The reference for every equivalence test is the latent formulation itself: a copy of the
model whose kernel is a torch parametrization W = m * V with V the Parameter, trained by
torch's own AdamW / SGD, in float64, so that the tolerance 1e-6 is far above rounding.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from repux.bfr import BFRSGD, BFRAdamW, bfr_param_groups, frequency_prior, init_kernels_with_prior
from repux.errors import InputError
from repux.network import RepUXNet, large_kernel_convs

F64 = torch.float64
STEPS = 30
RTOL = 1e-6


# --------------------------------------------------------------------------- helpers
class TinyNet(nn.Module):
    """depthwise 5^3 ``dw_a`` -> GroupNorm -> GELU -> depthwise 3^3 ``dw_b`` -> GELU -> spatial mean -> ``head``.

    (2, 4, 6, 6, 6) -> (2, 3). Two small depthwise convs keep the 30-step runs cheap.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dw_a = nn.Conv3d(4, 4, 5, padding=2, groups=4)
        self.norm = nn.GroupNorm(2, 4)
        self.dw_b = nn.Conv3d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.gelu(self.dw_b(F.gelu(self.norm(self.dw_a(x)))))
        return self.head(features.mean(dim=(2, 3, 4)))


class PriorTimesLatent(nn.Module):
    """Parametrization W = m * V: the module's Parameter is the latent V."""

    def __init__(self, prior: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("prior", prior)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.prior * latent


def latent_twin(model: nn.Module, priors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose kernels ``priors`` names are W = m * V with V = their current value."""
    twin = copy.deepcopy(model)
    for name, prior in priors.items():
        # No right_inverse: the latent Parameter starts as the current weight, V0.
        parametrize.register_parametrization(twin.get_submodule(name), "weight", PriorTimesLatent(prior), unsafe=True)
    return twin


def trained_param(model: nn.Module, name: str) -> nn.Parameter:
    """The Parameter an optimizer trains for ``name`` (the latent V where ``name`` is parametrized)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def effective(model: nn.Module, name: str) -> torch.Tensor:
    """The value the forward pass uses for ``name`` (m * V where it is parametrized)."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr).detach()


def groups_for(model: nn.Module, spec: list[tuple[list[str], dict]]) -> list[dict]:
    """Parameter groups from ``[(parameter names, options), ...]``; the names resolve on ``model``."""
    return [{"params": [trained_param(model, n) for n in names], **options} for names, options in spec]


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Largest difference relative to the largest magnitude of ``expected``, at most RTOL."""
    error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    assert error <= RTOL, f"{what}: relative difference {error:.3e} > {RTOL:.0e}"


def batches(seed: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, 4, 6, 6, 6, generator=generator, dtype=F64), torch.randn(2, 3, generator=generator, dtype=F64))
        for _ in range(steps)
    ]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    optimizer.zero_grad()
    F.mse_loss(model(batch[0]), batch[1]).backward()
    optimizer.step()


def run_against_latent(seed, make_optimizer, make_reference, spec, alphas, steps=STEPS):
    """Train TinyNet with BFR and its latent twin with torch side by side; compare W = m * V every step.

    ``spec``: the groups, ``[(parameter names, options), ...]``; a group holding the weight
    of a kernel named in ``alphas`` ({kernel module name: alpha}) gets that kernel's prior in
    the BFR optimizer (torch's optimizers ignore the key).
    """
    torch.manual_seed(seed)
    model = TinyNet().to(F64)
    priors = {
        name: frequency_prior(getattr(model, name).weight.shape[-1], alpha, dtype=F64) for name, alpha in alphas.items()
    }
    reference = latent_twin(model, priors)
    for name, alpha in alphas.items():
        init_kernels_with_prior(model, alpha, kernels=[(name, getattr(model, name))])
    bfr_groups = groups_for(model, spec)
    for group, (names, _) in zip(bfr_groups, spec):
        for name in names:
            if name.removesuffix(".weight") in priors:
                group["prior"] = priors[name.removesuffix(".weight")]
    optimizer = make_optimizer(bfr_groups)
    reference_optimizer = make_reference(groups_for(reference, spec))
    for step, batch in enumerate(batches(seed, steps)):
        train_step(model, optimizer, batch)
        train_step(reference, reference_optimizer, batch)
        for name, param in model.named_parameters():
            assert_relative_close(param.detach(), effective(reference, name), f"step {step + 1}, {name}")
    return model


REST = ["dw_a.bias", "norm.weight", "norm.bias", "dw_b.weight", "dw_b.bias", "head.weight", "head.bias"]


# --------------------------------------------------------------------------- the prior
@pytest.mark.parametrize("kernel_size", [1, 3, 7, 21])
@pytest.mark.parametrize("alpha", [1.0, 0.25, 3.0])
def test_prior_is_alpha_over_distance_plus_alpha(kernel_size: int, alpha: float) -> None:
    prior = frequency_prior(kernel_size, alpha, dtype=F64)
    assert prior.shape == (kernel_size,) * 3 and prior.dtype == F64
    centre = (kernel_size // 2,) * 3
    expected = [
        [[alpha / (math.dist((i, j, k), centre) + alpha) for k in range(kernel_size)] for j in range(kernel_size)]
        for i in range(kernel_size)
    ]
    torch.testing.assert_close(prior, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)


def test_prior_landmarks_of_the_paper() -> None:
    prior = frequency_prior(21)
    assert prior.dtype == torch.get_default_dtype()
    assert prior[10, 10, 10].item() == 1.0
    for face in [(9, 10, 10), (11, 10, 10), (10, 9, 10), (10, 11, 10), (10, 10, 9), (10, 10, 11)]:
        assert prior[face].item() == 0.5
    for corner in [(0, 0, 0), (20, 20, 20), (0, 20, 0)]:
        assert prior[corner].item() == pytest.approx(0.0546, abs=5e-5)
    assert prior.min().item() == prior[0, 0, 0].item() and prior.max().item() == 1.0


@pytest.mark.parametrize("kernel_size", [0, -3, 4, 20, 7.0, True, "7", None])
def test_prior_rejects_kernel_sizes_without_centre(kernel_size) -> None:
    with pytest.raises(InputError, match=r"kernel_size of the frequency prior must be an odd integer >= 1.*got"):
        frequency_prior(kernel_size)


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf, True, "1"])
def test_prior_rejects_bad_alpha(alpha) -> None:
    with pytest.raises(InputError, match=r"alpha of the frequency prior must be a finite number > 0, got"):
        frequency_prior(7, alpha)


# --------------------------------------------------------------------------- equivalence with the latent run
@pytest.mark.parametrize("seed, eps", [(0, 1e-8), (1, 1e-8), (2, 1e-3)])
def test_bfr_adamw_follows_latent_adamw(seed: int, eps: float) -> None:
    # eps 1e-3 is comparable to the root second moments here, so its 1/m scaling matters.
    options = dict(lr=1e-2, betas=(0.9, 0.99), eps=eps, weight_decay=0.05)
    spec = [(["dw_a.weight"], {}), (REST, {})]
    model = run_against_latent(
        seed, lambda g: BFRAdamW(g, **options), lambda g: torch.optim.AdamW(g, **options), spec, {"dw_a": 1.0}
    )
    assert model.dw_a.weight.shape == (4, 1, 5, 5, 5)


SGD_SETTINGS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.02, nesterov=True),
]
SGD_IDS = ["no-momentum", "momentum-dampening", "nesterov"]


@pytest.mark.parametrize("seed, options", list(enumerate(SGD_SETTINGS)), ids=SGD_IDS)
def test_bfr_sgd_follows_latent_sgd(seed: int, options: dict) -> None:
    spec = [(["dw_a.weight"], {}), (REST, {})]
    run_against_latent(
        seed, lambda g: BFRSGD(g, **options), lambda g: torch.optim.SGD(g, **options), spec, {"dw_a": 1.0}
    )


@pytest.mark.parametrize("optimizers", ["adamw", "sgd"])
def test_mixed_groups_two_priors_and_plain_groups(optimizers: str) -> None:
    spec = [
        (["dw_a.weight"], {"lr": 2e-2, "weight_decay": 0.1}),
        (["dw_b.weight"], {"lr": 1e-2, "weight_decay": 0.0}),
        (["head.weight", "head.bias"], {"lr": 5e-3, "weight_decay": 0.0}),
        ([n for n in REST if not n.startswith(("head", "dw_b.weight"))], {}),
    ]
    if optimizers == "adamw":
        options = dict(lr=1e-2, eps=1e-4, weight_decay=0.01)
        pair = (lambda g: BFRAdamW(g, **options), lambda g: torch.optim.AdamW(g, **options))
    else:
        options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02)
        pair = (lambda g: BFRSGD(g, **options), lambda g: torch.optim.SGD(g, **options))
    run_against_latent(3, *pair, spec, {"dw_a": 1.0, "dw_b": 0.5})


@pytest.mark.parametrize("optimizers", ["adamw", "sgd"])
def test_comparison_detects_a_wrong_update(optimizers: str) -> None:
    # The tolerance must separate the right update from wrong ones: the plain optimizer on W
    # (no prior), and for AdamW an eps off by 10x (a wrong eps scaling is of that order).
    spec = [(["dw_a.weight"], {}), (REST, {})]
    if optimizers == "adamw":
        reference = lambda g: torch.optim.AdamW(g, lr=1e-2, eps=1e-3)  # noqa: E731
        wrong = [lambda g: torch.optim.AdamW(g, lr=1e-2, eps=1e-3), lambda g: BFRAdamW(g, lr=1e-2, eps=1e-2)]
    else:
        reference = lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9)  # noqa: E731
        wrong = [lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9)]
    for make_optimizer in wrong:
        with pytest.raises(AssertionError, match="relative difference"):
            # torch's optimizers ignore the "prior" key: that is the no-prior control.
            run_against_latent(0, make_optimizer, reference, spec, {"dw_a": 1.0}, steps=5)


# --------------------------------------------------------------------------- groups without a prior
def two_plain_groups(model: nn.Module) -> list[dict]:
    return [
        {"params": [model.head.weight, model.dw_a.weight], "lr": 3e-3, "weight_decay": 0.2},
        {"params": [p for n, p in model.named_parameters() if n not in ("head.weight", "dw_a.weight")]},
    ]


def assert_equal_to_torch(make_ours, make_torch, seed: int, steps: int) -> None:
    """Ours, torch's for-loop and torch's foreach implementation, in lockstep: equal bit for bit."""
    torch.manual_seed(seed)
    model = TinyNet().to(F64)
    runs = [(model, make_ours(two_plain_groups(model)))]
    for foreach in (False, True):
        twin = copy.deepcopy(model)
        runs.append((twin, make_torch(two_plain_groups(twin), foreach)))
    for step, batch in enumerate(batches(seed, steps)):
        for net, optimizer in runs:
            train_step(net, optimizer, batch)
        for (name, ours), *theirs in zip(model.named_parameters(), *(net.parameters() for net, _ in runs[1:])):
            for foreach, other in zip((False, True), theirs):
                assert torch.equal(ours, other), f"step {step + 1}, {name} differs from torch (foreach={foreach})"
    for ours, *theirs in zip(*(net.parameters() for net, _ in runs)):
        for other, (_, optimizer) in zip(theirs, runs[1:]):
            state, torch_state = runs[0][1].state[ours], optimizer.state[other]
            assert set(state) == set(torch_state) and all(torch.equal(state[k], torch_state[k]) for k in state)


def test_plain_groups_equal_torch_adamw_bit_for_bit() -> None:
    options = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.03)
    assert_equal_to_torch(
        lambda g: BFRAdamW(g, **options), lambda g, foreach: torch.optim.AdamW(g, **options, foreach=foreach), 5, STEPS
    )


@pytest.mark.parametrize("options", SGD_SETTINGS, ids=SGD_IDS)
def test_plain_groups_equal_torch_sgd_bit_for_bit(options: dict) -> None:
    assert_equal_to_torch(
        lambda g: BFRSGD(g, **options), lambda g, foreach: torch.optim.SGD(g, **options, foreach=foreach), 6, 20
    )


def test_state_of_torch_adamw_continues_in_bfr_adamw() -> None:
    # Same state layout: a run started with torch's AdamW resumes here without a jump.
    torch.manual_seed(2)
    model = TinyNet().to(F64)
    data = batches(7, 10)
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in data[:5]:
        train_step(model, torch_optimizer, batch)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    # Deep copies: torch's load_state_dict keeps the saved tensors, which would then be shared.
    twin_optimizer.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))
    optimizer = BFRAdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))
    for batch in data[5:]:
        train_step(model, optimizer, batch)
        train_step(twin, twin_optimizer, batch)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# --------------------------------------------------------------------------- state_dict
def bfr_groups_for_tiny(model: nn.Module, prior: torch.Tensor) -> list[dict]:
    return [
        {"params": [model.dw_a.weight], "prior": prior, "weight_decay": 0.1},
        {"params": [p for n, p in model.named_parameters() if n != "dw_a.weight"]},
    ]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda g: BFRAdamW(g, lr=1e-2, eps=1e-4),
        lambda g: BFRSGD(g, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ],
    ids=["adamw", "sgd"],
)
def test_state_dict_round_trip_mid_run_continues_identically(make_optimizer) -> None:
    torch.manual_seed(4)
    start = TinyNet().to(F64)
    prior = frequency_prior(5, dtype=F64)
    data = batches(8, 20)

    model = copy.deepcopy(start)
    optimizer = make_optimizer(bfr_groups_for_tiny(model, prior))
    uninterrupted = []
    for batch in data:
        train_step(model, optimizer, batch)
        uninterrupted.append([p.detach().clone() for p in model.parameters()])

    model = copy.deepcopy(start)
    optimizer = make_optimizer(bfr_groups_for_tiny(model, prior))
    for batch in data[:10]:
        train_step(model, optimizer, batch)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)

    resumed = TinyNet().to(F64)
    resumed.load_state_dict(checkpoint["model"])
    # A deliberately different prior: the saved one must replace it.
    resumed_optimizer = make_optimizer(bfr_groups_for_tiny(resumed, torch.ones(5, 5, 5, dtype=F64)))
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert torch.equal(resumed_optimizer.param_groups[0]["prior"], prior)
    assert resumed_optimizer.param_groups[1]["prior"] is None
    for step, batch in enumerate(data[10:], start=10):
        train_step(resumed, resumed_optimizer, batch)
        for name, a, b in zip([n for n, _ in resumed.named_parameters()], resumed.parameters(), uninterrupted[step]):
            assert torch.equal(a, b), f"step {step + 1}, {name} differs after the state_dict round trip"


def test_load_state_dict_refuses_a_state_without_the_prior() -> None:
    model = TinyNet().to(F64)
    groups = bfr_groups_for_tiny(model, frequency_prior(5, dtype=F64))
    plain = torch.optim.AdamW([{"params": g["params"]} for g in groups])
    optimizer = BFRAdamW(groups)
    with pytest.raises(InputError, match="parameter group 0 has a frequency prior but the saved state has none"):
        optimizer.load_state_dict(plain.state_dict())
    state = optimizer.state_dict()
    state["param_groups"][0]["prior"] = torch.ones(3, 3, 3, dtype=F64)
    with pytest.raises(InputError, match=r"prior of shape \(3, 3, 3\) does not broadcast to .* \(4, 1, 5, 5, 5\)"):
        optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["prior"].shape == (5, 5, 5)


# --------------------------------------------------------------------------- argument checks
def test_optimizers_reject_bad_hyperparameters() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    for kwargs, message in [
        (dict(lr=-1.0), r"lr must be a finite number >= 0.0, got -1.0"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\] must be a finite number in \[0.0, 1.0\), got 1.0"),
        (dict(betas=(0.9,)), r"betas must be two numbers"),
        (dict(eps=math.nan), r"eps must be a finite number >= 0.0, got nan"),
        (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0.0, got -0.1"),
    ]:
        with pytest.raises(InputError, match=message):
            BFRAdamW(params, **kwargs)
    for kwargs, message in [
        (dict(lr=math.inf), r"lr must be a finite number"),
        (dict(lr=0.1, momentum=-0.5), r"momentum must be a finite number >= 0.0, got -0.5"),
        (dict(lr=0.1, nesterov=True), r"nesterov needs momentum > 0 and dampening 0"),
        (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), r"nesterov needs momentum > 0 and dampening 0"),
    ]:
        with pytest.raises(InputError, match=message):
            BFRSGD(params, **kwargs)
    with pytest.raises(TypeError):
        BFRSGD(params)  # lr has no default, as the issue asks
    with pytest.raises(TypeError, match="amsgrad"):
        BFRAdamW(params, amsgrad=True)
    with pytest.raises(InputError, match=r"parameter group 0: option amsgrad=True is not supported"):
        BFRAdamW([{"params": params, "amsgrad": True}])
    with pytest.raises(InputError, match=r"parameter group 1: option maximize=True is not supported"):
        BFRSGD([{"params": params}, {"params": [nn.Parameter(torch.zeros(2))], "maximize": True}], lr=0.1)
    with pytest.raises(InputError, match="complex parameters are not supported"):
        BFRAdamW([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


@pytest.mark.parametrize(
    "prior, message",
    [
        (torch.zeros(5, 5, 5), r"every element of the prior must be finite and > 0.*got min 0.0"),
        (-frequency_prior(5), r"every element of the prior must be finite and > 0"),
        (torch.full((5, 5, 5), math.nan), r"every element of the prior must be finite and > 0"),
        (frequency_prior(3), r"prior of shape \(3, 3, 3\) does not broadcast to a parameter of shape \(4, 1, 5, 5, 5"),
        (torch.ones(2, 4, 1, 5, 5, 5), r"prior of shape \(2, 4, 1, 5, 5, 5\) does not broadcast"),
        (torch.ones(5, 5, 5, dtype=torch.int64), r"prior must be a real floating-point torch.Tensor"),
        ([1.0], r"prior must be a real floating-point torch.Tensor"),
    ],
)
def test_optimizers_reject_bad_priors(prior, message: str) -> None:
    model = TinyNet()
    for make in (lambda g: BFRAdamW(g), lambda g: BFRSGD(g, lr=0.1)):
        with pytest.raises(InputError, match=r"parameter group 0: " + message):
            make([{"params": [model.dw_a.weight], "prior": prior}])


# --------------------------------------------------------------------------- groups and initialisation
def test_param_groups_of_a_small_module_with_explicit_kernels() -> None:
    model = TinyNet()
    model.head.bias.requires_grad_(False)
    kernels = [("dw_a", model.dw_a), ("dw_b", model.dw_b)]
    groups = bfr_param_groups(model, alpha=0.5, weight_decay=0.02, kernels=kernels)
    assert [g["name"] for g in groups] == ["large_kernels_5", "large_kernels_3", "other"]
    assert groups[0]["params"] == [model.dw_a.weight] and groups[1]["params"] == [model.dw_b.weight]
    assert torch.equal(groups[0]["prior"], frequency_prior(5, 0.5, dtype=F64))
    assert torch.equal(groups[1]["prior"], frequency_prior(3, 0.5, dtype=F64))
    assert "prior" not in groups[2] and all(g["weight_decay"] == 0.02 for g in groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable) and id(model.head.bias) not in grouped
    assert id(model.dw_a.bias) in {id(p) for p in groups[2]["params"]}

    split = bfr_param_groups(model, alpha=0.5, no_decay_for_1d=True, kernels=kernels)
    assert [(g["name"], g["weight_decay"]) for g in split] == [
        ("large_kernels_5", 0.01), ("large_kernels_3", 0.01), ("other", 0.01), ("no_decay_1d", 0.0)
    ]
    assert all(p.ndim <= 1 for p in split[3]["params"]) and all(p.ndim > 1 for p in split[2]["params"])
    BFRAdamW(split)  # the groups are valid optimizer input


def test_param_groups_reject_models_without_depthwise_kernels() -> None:
    with pytest.raises(InputError, match="Linear has no large depthwise kernels"):
        bfr_param_groups(nn.Linear(3, 3))
    dense = nn.Conv3d(4, 4, 5)
    with pytest.raises(InputError, match=r"kernel 'dense': expected a depthwise Conv3d.*\(4, 4, 5, 5, 5\)"):
        bfr_param_groups(dense, kernels=[("dense", dense)])


def small_repuxnet(**kwargs) -> RepUXNet:
    return RepUXNet(in_chans=1, out_chans=3, feat_size=(4, 8, 16, 32), hidden_size=32, ks=7, **kwargs)


def test_param_groups_of_a_repuxnet() -> None:
    torch.manual_seed(0)
    model = small_repuxnet(a=0.5)
    kernels = large_kernel_convs(model)
    assert len(kernels) == 8
    groups = bfr_param_groups(model)
    assert [g["name"] for g in groups] == ["large_kernels_7", "other"]
    assert [id(p) for p in groups[0]["params"]] == [id(conv.weight) for _, conv in kernels]
    # alpha defaults to the network's own a
    assert torch.equal(groups[0]["prior"], frequency_prior(7, 0.5, dtype=F64))
    other = {id(p) for p in groups[1]["params"]}
    assert all(id(conv.bias) in other for _, conv in kernels)
    assert len(other) + 8 == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.01 for g in groups)


def test_init_kernels_with_prior_scales_only_the_large_kernels() -> None:
    torch.manual_seed(0)
    model = small_repuxnet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = init_kernels_with_prior(model, alpha=2.0)
    assert names == [n for n, _ in large_kernel_convs(model)] and len(names) == 8
    prior = frequency_prior(7, 2.0, dtype=F64).float()
    for name, param in model.named_parameters():
        expected = before[name] * prior if name.removesuffix(".weight") in names else before[name]
        assert torch.equal(param.detach(), expected), name


# --------------------------------------------------------------------------- RepUX-Net training
def assert_kernels_trained(
    initial: dict[str, torch.Tensor], model: nn.Module, prior: torch.Tensor, powers: int = 1000
) -> None:
    """The large kernels were trained: centre and off-centre taps moved, and no kernel is kernel0 * m^n.

    The published code replaced each kernel by a detached copy of weight * m in every
    forward pass, so the optimizer never updated it: kernel0 * m^n after n passes.
    """
    off_centre = prior < 1
    problems = []
    for name, conv in large_kernel_convs(model):
        kernel, kernel0 = conv.weight.detach(), initial[name]
        scale = kernel0.abs().max()
        if (kernel - kernel0)[..., off_centre].abs().max() <= 1e-4 * scale:
            problems.append(f"{name}: off-centre taps did not move")
        if (kernel - kernel0)[..., ~off_centre].abs().max() <= 1e-4 * scale:
            problems.append(f"{name}: centre taps did not move")
        for n in range(1, powers + 1):
            if torch.allclose(kernel, kernel0 * prior.to(kernel0) ** n, rtol=1e-5, atol=1e-6 * scale):
                problems.append(f"{name} is kernel0 * m^{n}")
                break
    assert not problems, "large kernels not trained: " + "; ".join(problems)


def repux_batches(steps: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    # 16 x 16 x 32: the smallest input whose deepest level still has 2 voxels to normalise.
    return [
        (
            torch.randn(1, 1, 16, 16, 32, generator=generator, dtype=dtype),
            torch.randint(0, 3, (1, 16, 16, 32), generator=generator),
        )
        for _ in range(steps)
    ]


def repux_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def test_repuxnet_bfr_training_equals_latent_training_and_trains_the_kernels() -> None:
    torch.manual_seed(0)
    model = small_repuxnet().to(F64)
    prior = frequency_prior(7, dtype=F64)
    names = [n for n, _ in large_kernel_convs(model)]
    reference = latent_twin(model, {n: prior for n in names})
    init_kernels_with_prior(model)
    initial = {n: conv.weight.detach().clone() for n, conv in large_kernel_convs(model)}
    optimizer = BFRAdamW(bfr_param_groups(model), lr=1e-3)
    reference_params = [trained_param(reference, n + ".weight") for n in names]
    others = [p for p in reference.parameters() if all(p is not q for q in reference_params)]
    reference_optimizer = torch.optim.AdamW([{"params": reference_params}, {"params": others}], lr=1e-3)
    for step, batch in enumerate(repux_batches(3, F64)):
        repux_step(model, optimizer, batch)
        repux_step(reference, reference_optimizer, batch)
        for name, param in model.named_parameters():
            assert_relative_close(param.detach(), effective(reference, name), f"step {step + 1}, {name}")
    assert_kernels_trained(initial, model, prior)


def test_kernel_check_catches_the_published_never_trained_kernels() -> None:
    torch.manual_seed(0)
    model = small_repuxnet()
    prior = frequency_prior(7)
    initial = {n: conv.weight.detach().clone() for n, conv in large_kernel_convs(model)}

    def published_forward_pre_hook(conv: nn.Conv3d, _inputs) -> None:
        conv.weight = nn.Parameter((conv.weight * prior).detach())

    for _, conv in large_kernel_convs(model):
        conv.register_forward_pre_hook(published_forward_pre_hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built once, as published
    for batch in repux_batches(3, torch.float32):
        repux_step(model, optimizer, batch)
    name, conv = large_kernel_convs(model)[0]
    assert torch.allclose(conv.weight, initial[name] * prior**3)  # the simulation is faithful
    with pytest.raises(AssertionError) as caught:
        assert_kernels_trained(initial, model, prior)
    for name, _ in large_kernel_convs(model):
        assert f"{name}: centre taps did not move" in str(caught.value)
        assert f"{name} is kernel0 * m^3" in str(caught.value)
