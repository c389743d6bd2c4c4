"""repux.accel: every inference rewrite computes the function of the plain network.

Tolerances, and why:
- kernel trimming and BatchNorm folding are exact algebra: checked in float64, where any
  misplaced tap or padding shows as an error of order 1, against ~1e-12 of rounding;
- FFT convolution in float32 rounds differently from a direct sum: its error is checked
  against a float64 reference to 1e-5 of the output's magnitude (measured ~4e-6 for 21^3
  kernels; a wrong tap would be of order 1e-1);
- whole networks in float32: logits to 1e-4 of their magnitude (instance norms and 20-odd
  layers amplify rounding a little);
- bfloat16 keeps ~3 significant digits: argmax agreement on 97 % of voxels.
Widths are tiny; the paper-width timing lives in benchmarks/segment_speed.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repux.accel import (
    DepthwiseConv3d,
    InferenceOptions,
    OptimizedNetwork,
    effective_kernel_size,
    fft_depthwise_conv3d,
    fold_batchnorm,
    native_bfloat16,
    optimize_for_inference,
)
from repux.accel.fft_conv import fft_length, fft_lengths
from repux.accel.instance_norm import LayoutAwareInstanceNorm3d
from repux.accel.kernel_support import centre_crop, reachable_kernel_size
from repux.network import RepUXNet, UXNet, large_kernel_convs

TINY_REPUX = dict(in_chans=1, out_chans=3, depths=(2, 1, 1, 2), feat_size=(4, 8, 12, 16), ks=9, hidden_size=24)
TINY_UX = dict(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(4, 8, 8, 12), hidden_size=16)
# Anisotropic sides so that a swapped axis cannot go unnoticed.
TINY_INPUT = (2, 1, 32, 16, 48)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).abs().max() / reference.double().abs().max())


def randomized(net: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine values (the defaults would hide a wrong fold)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 2 + 0.2)
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return net.eval()


def zero_outside(weight: torch.Tensor, size: int) -> None:
    """Zero every tap of ``weight`` outside its central ``size``^3 cube, in place."""
    mask = torch.zeros_like(weight)
    k, s = weight.shape[-1], size
    lo, hi = (k - s) // 2, (k + s) // 2
    mask[..., lo:hi, lo:hi, lo:hi] = 1
    weight.mul_(mask)


# ---------------------------------------------------------------- kernel support


@pytest.mark.parametrize("size", [1, 3, 7, 21])
def test_effective_kernel_size_finds_the_outermost_nonzero_tap(size: int) -> None:
    weight = torch.zeros(6, 1, 21, 21, 21)
    centre, r = 10, size // 2
    weight[:, :, centre, centre, centre] = 1.0
    # One tap on the cube's surface, in one channel only, on one axis only.
    weight[4, 0, centre, centre + r, centre] = -1e-30
    assert effective_kernel_size(weight) == size
    weight[4, 0, centre, centre + r, centre] = 0.0
    assert effective_kernel_size(weight) == 1


def test_effective_kernel_size_of_an_all_zero_kernel_and_bad_shapes() -> None:
    assert effective_kernel_size(torch.zeros(3, 1, 5, 5, 5)) == 1
    with pytest.raises(ValueError, match="odd side"):
        effective_kernel_size(torch.zeros(3, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="odd side"):
        effective_kernel_size(torch.zeros(3, 1, 5, 5, 3))


def test_trimmed_kernel_computes_the_same_convolution() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 1, 21, 21, 21, generator=gen, dtype=torch.float64)
    zero_outside(weight, 7)
    x = torch.randn(1, 5, 12, 8, 10, generator=gen, dtype=torch.float64)
    size = effective_kernel_size(weight)
    assert size == 7
    full = F.conv3d(x, weight, padding=10, groups=5)
    trimmed = F.conv3d(x, centre_crop(weight, (size,) * 3), padding=size // 2, groups=5)
    assert relative_error(trimmed, full) < 1e-12


def test_taps_beyond_the_input_length_never_contribute() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 1, 21, 21, 21, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 4, 6, 3, 12, generator=gen, dtype=torch.float64)
    sizes = tuple(reachable_kernel_size(21, n) for n in x.shape[2:])
    assert sizes == (11, 5, 21)  # 2n - 1 taps reach an input of n voxels
    full = F.conv3d(x, weight, padding=10, groups=4)
    cropped = F.conv3d(x, centre_crop(weight, sizes), padding=tuple(s // 2 for s in sizes), groups=4)
    assert relative_error(cropped, full) < 1e-12


# ---------------------------------------------------------------- BatchNorm folding


def test_fold_batchnorm_is_exact_in_eval_mode() -> None:
    conv = nn.Conv3d(6, 6, 5, padding=2, groups=6, bias=True).double()
    norm = randomized(nn.BatchNorm3d(6).double(), seed=3)
    x = torch.randn(2, 6, 10, 12, 8, dtype=torch.float64)
    weight, bias = fold_batchnorm(conv.weight, conv.bias, norm)
    with torch.no_grad():
        expected = norm(conv(x))
        folded = F.conv3d(x, weight, bias, padding=2, groups=6)
    assert relative_error(folded, expected) < 1e-12


def test_fold_batchnorm_without_conv_bias_and_without_statistics() -> None:
    conv = nn.Conv3d(3, 3, 3, padding=1, groups=3, bias=False).double()
    norm = randomized(nn.BatchNorm3d(3).double(), seed=4)
    x = torch.randn(1, 3, 6, 6, 6, dtype=torch.float64)
    weight, bias = fold_batchnorm(conv.weight, None, norm)
    with torch.no_grad():
        assert relative_error(F.conv3d(x, weight, bias, padding=1, groups=3), norm(conv(x))) < 1e-12
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(conv.weight, None, nn.BatchNorm3d(3, track_running_stats=False))


# ---------------------------------------------------------------- FFT convolution


def test_fft_length_is_the_next_2_3_5_smooth_number() -> None:
    smooth = [n for n in range(1, 200) if all(p in (2, 3, 5) for p in _prime_factors(n))]
    for minimum in range(1, 150):
        assert fft_length(minimum) == min(n for n in smooth if n >= minimum)


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


@pytest.mark.parametrize(
    ("kernel", "shape"),
    [((21, 21, 21), (2, 2, 12, 8, 10)), ((5, 3, 7), (1, 4, 9, 13, 11)), ((21, 21, 21), (1, 2, 6, 24, 5))],
)
def test_fft_depthwise_conv_matches_the_direct_convolution(kernel: tuple, shape: tuple) -> None:
    gen = torch.Generator().manual_seed(5)
    channels = shape[1]
    weight = torch.randn(channels, 1, *kernel, generator=gen)
    bias = torch.randn(channels, generator=gen)
    x = torch.randn(shape, generator=gen)
    padding = tuple(k // 2 for k in kernel)
    exact = F.conv3d(x.double(), weight.double(), bias.double(), padding=padding, groups=channels)
    # A chunk budget of one channel exercises the channel loop.
    by_fft = fft_depthwise_conv3d(x, weight, bias, chunk_bytes=1)
    assert by_fft.dtype == torch.float32 and by_fft.shape == x.shape
    assert relative_error(by_fft, exact) < 1e-5
    assert fft_lengths(shape[2:], kernel) == tuple(fft_length(n + k // 2) for n, k in zip(shape[2:], kernel))


def test_fft_depthwise_conv_keeps_channels_last_and_the_input_dtype() -> None:
    x = torch.randn(1, 3, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, 1, 5, 5, 5)
    out = fft_depthwise_conv3d(x, weight)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert relative_error(out, F.conv3d(x.double(), weight.double(), padding=2, groups=3)) < 1e-5
    half = fft_depthwise_conv3d(x.bfloat16(), weight)
    assert half.dtype == torch.bfloat16


# ---------------------------------------------------------------- depthwise module


def test_depthwise_module_plans_affine_direct_and_fft() -> None:
    big = DepthwiseConv3d(torch.randn(48, 1, 21, 21, 21))
    assert big.plan((48, 48, 48)) == ("fft", (21, 21, 21))
    # On a 6^3 input only the central 11^3 taps matter, and a direct conv is cheaper.
    assert big.plan((6, 6, 6)) == ("direct", (11, 11, 11))
    assert big.plan((1, 1, 1)) == ("affine", (1, 1, 1))
    assert DepthwiseConv3d(torch.randn(8, 1, 3, 3, 3)).plan((48, 48, 48)) == ("direct", (3, 3, 3))
    assert DepthwiseConv3d(torch.randn(8, 1, 3, 3, 3), method="fft").plan((48, 48, 48))[0] == "fft"
    with pytest.raises(ValueError, match="method"):
        DepthwiseConv3d(torch.randn(8, 1, 3, 3, 3), method="winograd")
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv3d(torch.randn(8, 1, 4, 4, 4))


@pytest.mark.parametrize("method", ["auto", "direct", "fft"])
@pytest.mark.parametrize("kernel", [1, 5, 21])
def test_depthwise_module_computes_the_convolution(method: str, kernel: int) -> None:
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(3, 1, kernel, kernel, kernel, generator=gen)
    bias = torch.randn(3, generator=gen)
    module = DepthwiseConv3d(weight, bias, method)
    for shape in [(2, 3, 12, 8, 16), (1, 3, 4, 20, 6)]:  # two shapes: the spectrum cache must follow
        x = torch.randn(shape, generator=gen)
        exact = F.conv3d(x.double(), weight.double(), bias.double(), padding=kernel // 2, groups=3)
        assert relative_error(module(x), exact) < 1e-5
    module.double()
    x = torch.randn(1, 3, 12, 8, 16, generator=gen, dtype=torch.float64)
    exact = F.conv3d(x, weight.double(), bias.double(), padding=kernel // 2, groups=3)
    assert relative_error(module(x), exact) < 1e-5


# ---------------------------------------------------------------- whole networks


# ---------------------------------------------------------------- instance norm


@pytest.mark.parametrize("batch, channels, shape", [(1, 5, (6, 7, 9)), (2, 3, (4, 10, 3))])
def test_layout_aware_instance_norm_matches_torch_in_both_layouts(batch: int, channels: int, shape: tuple) -> None:
    torch.manual_seed(4)
    # An offset mean and uneven scales per channel: a variance without centring would drift.
    x = torch.randn(batch, channels, *shape, dtype=torch.float64) * torch.rand(1, channels, 1, 1, 1) * 3 + 5
    norm = LayoutAwareInstanceNorm3d.replacing(nn.InstanceNorm3d(channels, eps=1e-3))
    expected = F.instance_norm(x, eps=1e-3)
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    got = norm(channels_last)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert relative_error(got, expected) < 1e-12
    assert relative_error(norm(x), expected) < 1e-12
    with pytest.raises(ValueError, match="affine"):
        LayoutAwareInstanceNorm3d.replacing(nn.InstanceNorm3d(channels, affine=True))


def test_layout_aware_instance_norm_keeps_float32_statistics_under_bfloat16_autocast() -> None:
    # Autocast rounds matrix products' operands to bfloat16; the statistics must not be.
    torch.manual_seed(5)
    x = torch.randn(1, 6, 40, 40, 40, dtype=torch.float64) * 0.5 + 20
    expected = F.instance_norm(x, eps=1e-5)
    channels_last = x.float().contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LayoutAwareInstanceNorm3d()(channels_last)
    assert got.dtype == torch.float32 and relative_error(got.double(), expected) < 1e-5


def test_layout_aware_instance_norm_of_bfloat16_activations() -> None:
    torch.manual_seed(6)
    x = torch.randn(1, 6, 20, 24, 28, dtype=torch.float64) * torch.rand(1, 6, 1, 1, 1) * 3 + 5
    expected = F.instance_norm(x, eps=1e-5)
    channels_last = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = LayoutAwareInstanceNorm3d()(channels_last)
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last_3d)
        # No worse than normalising the bfloat16 input exactly and rounding the result to bfloat16.
        best = F.instance_norm(channels_last.double(), eps=1e-5).to(torch.bfloat16).double()
        assert (got.double() - expected).abs().max() <= 1.5 * (best - expected).abs().max()


def test_optimized_repuxnet_computes_the_same_function_and_leaves_the_original() -> None:
    torch.manual_seed(7)
    net = randomized(RepUXNet(**TINY_REPUX), seed=7)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(TINY_INPUT)
    optimized = optimize_for_inference(net)
    with torch.inference_mode():
        expected = net(x)
        got = optimized(x)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == expected.shape
    assert relative_error(got, expected) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(isinstance(m, nn.BatchNorm3d) for n, m in net.named_modules() if n.endswith(".norm"))
    rewritten = [conv for _, conv in large_kernel_convs(optimized.network)]
    assert len(rewritten) == 6 and all(isinstance(conv, DepthwiseConv3d) for conv in rewritten)
    assert len(optimized.report.layers) == 6 and all("BatchNorm folded" in line for line in optimized.report.layers)


def test_in_place_optimization_rewrites_the_network_itself_with_the_same_function() -> None:
    net = randomized(RepUXNet(**TINY_REPUX), seed=9).eval()
    x = torch.randn(TINY_INPUT)
    with torch.inference_mode():
        expected = optimize_for_inference(net)(x)
        optimized = optimize_for_inference(net, in_place=True)
        assert optimized.network is net  # consumed: no copy of its weights
        assert torch.equal(optimized(x), expected)


def test_kernels_zero_outside_the_centre_are_trimmed_per_conv() -> None:
    torch.manual_seed(8)
    net = randomized(RepUXNet(**TINY_REPUX), seed=8)
    convs = [conv for _, conv in large_kernel_convs(net)]
    with torch.no_grad():
        for conv in convs[:-1]:
            zero_outside(conv.weight, 1)
        zero_outside(convs[-1].weight, 3)  # one conv keeps a shell: trimming is per conv
    x = torch.randn(TINY_INPUT)
    optimized = optimize_for_inference(net)
    sizes = [conv.kernel_size for _, conv in large_kernel_convs(optimized.network)]
    assert sizes == [(1, 1, 1)] * 5 + [(3, 3, 3)]
    assert "9^3 -> 1^3" in optimized.report.layers[0] and "9^3 -> 3^3" in optimized.report.layers[-1]
    with torch.inference_mode():
        assert relative_error(optimized(x), net(x)) < 1e-4


@pytest.mark.parametrize("channels_last", [True, False])
def test_optimized_uxnet_and_option_combinations(channels_last: bool) -> None:
    torch.manual_seed(9)
    net = UXNet(**TINY_UX).eval()
    x = torch.randn(TINY_INPUT)
    options = InferenceOptions(channels_last=channels_last, depthwise="fft", fold_batchnorm=False)
    optimized = optimize_for_inference(net, options=options)
    with torch.inference_mode():
        assert relative_error(optimized(x), net(x)) < 1e-4
    assert all("fft evaluation" in line for line in optimized.report.layers)
    with pytest.raises(ValueError, match="depthwise"):
        InferenceOptions(depthwise="winograd")
    with pytest.raises(ValueError, match="precision"):
        InferenceOptions(precision="float16")


def test_bfloat16_is_used_only_where_native() -> None:
    net = randomized(RepUXNet(**TINY_REPUX), seed=10)
    optimized = optimize_for_inference(net, "cpu", InferenceOptions(precision="bfloat16"))
    if native_bfloat16("cpu"):
        assert optimized.autocast_dtype == torch.bfloat16
        assert not any("kept float32" in note for note in optimized.report.notes)
    else:
        assert optimized.autocast_dtype is None
        assert any("kept float32" in note for note in optimized.report.notes)


def test_bfloat16_autocast_agrees_on_the_argmax() -> None:
    torch.manual_seed(11)
    net = randomized(RepUXNet(**TINY_REPUX), seed=11)
    plain = optimize_for_inference(net)
    # Forced autocast, even where bf16 is emulated: the function must stay the same.
    half = OptimizedNetwork(plain.network, True, torch.bfloat16, plain.report)
    x = torch.randn(1, 1, 32, 16, 32)
    with torch.inference_mode():
        expected = net(x)
        got = half(x)
    assert got.dtype == torch.float32
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement > 0.97
    assert relative_error(got, expected) < 0.1


# ---------------------------------------------------------------- constant windows


def test_constant_windows_are_computed_once_and_give_the_same_logits() -> None:
    torch.manual_seed(12)
    net = randomized(RepUXNet(**TINY_REPUX), seed=12)
    calls = []
    net.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[0]))
    optimized = optimize_for_inference(net)
    x = torch.randn(4, 1, 32, 16, 48)
    x[1] = 0.0  # air after the intensity window
    x[3] = 0.0
    x[2, 0, 5, 5, 5] = 0.25  # nearly constant: must be computed
    with torch.inference_mode():
        expected = torch.cat([net(x[b : b + 1]) for b in range(4)])
        calls.clear()
        first = optimized(x)
        assert sorted(calls) == [1, 2]  # the two varying windows together, one constant window alone
        calls.clear()
        again = optimized(x[1:2].clone().fill_(0.0))
        assert calls == []  # remembered
        other_value = optimized(torch.full((1, 1, 32, 16, 48), 1.0))
        assert calls == [1]
        assert relative_error(other_value, net(torch.full((1, 1, 32, 16, 48), 1.0))) < 1e-4
    assert relative_error(first, expected) < 1e-4
    assert torch.equal(again[0], first[1]) and torch.equal(first[1], first[3])
    plain = optimize_for_inference(net, options=InferenceOptions(reuse_constant_windows=False))
    assert plain.constant_inputs is None
