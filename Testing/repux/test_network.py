"""repux.network: published state_dict layout, numerics of the blocks, decoder wiring, configs.

Forward passes use tiny widths; the default-width networks are built on the meta device.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from repux.errors import InputError
from repux.network import (
    ARCHITECTURES,
    NETWORK_PRESETS,
    ChannelsFirstLayerNorm,
    RepUXBlock,
    RepUXNet,
    UXBlock,
    UXNet,
    build_network,
    config_from_state_dict,
    large_kernel_convs,
)

# Every key and shape of the published networks at in_chans=1, out_chans=5 (spec facts).
SPEC = Path(__file__).with_name("data") / "original_state_dicts.json"

# Published encoder prefixes and the spec's constructor defaults (in_chans=1, out_chans=5).
PREFIX = {"repuxnet": "repuxnet_3d.", "uxnet": "uxnet_3d."}
PUBLISHED_DEFAULTS = {"depths": [2, 2, 2, 2], "feat_size": [48, 96, 192, 384], "hidden_size": 768}

TINY = {
    "repuxnet": dict(
        in_chans=1, out_chans=3, depths=(2, 1, 1, 2), feat_size=(4, 8, 12, 16), ks=5, a=0.5, hidden_size=24
    ),
    "uxnet": dict(in_chans=2, out_chans=4, depths=(1, 2, 1, 1), feat_size=(4, 8, 8, 12), hidden_size=20),
}
# Anisotropic sides (multiples of 16) so that a swapped axis cannot go unnoticed.
TINY_INPUT = (32, 16, 48)


def published_shapes(arch: str) -> dict[str, list[int]]:
    tables = json.loads(SPEC.read_text())
    (table,) = [shapes for title, shapes in tables.items() if title.lower().startswith(f"{arch}(")]
    return table


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for the 1-D parameters and BatchNorm statistics (their defaults hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.is_floating_point() and tensor.ndim == 1:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5 + (1.0 if "gamma" in name else 0.0))
    return net.eval()


def tiny_net(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomized(build_network(arch, **TINY[arch]), seed)


def tiny_input(arch: str, batch: int = 2, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, TINY[arch]["in_chans"], *TINY_INPUT), generator=gen)


def ln_channels_first(x, weight, bias, eps=1e-6):
    y = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), weight, bias, eps)
    return y.permute(0, 4, 1, 2, 3)


def reference_forward(arch: str, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The published forward, written from the spec: encoder from state_dict keys, decoder wiring."""
    sd = net.state_dict()
    p = PREFIX[arch]
    depths = net.config["depths"]
    h, skips = x, []
    for stage in range(4):
        if stage == 0:
            h = F.conv3d(h, sd[f"{p}downsample_layers.0.0.weight"], sd[f"{p}downsample_layers.0.0.bias"], 2, 3)
            h = ln_channels_first(h, sd[f"{p}downsample_layers.0.1.weight"], sd[f"{p}downsample_layers.0.1.bias"])
        else:
            d = f"{p}downsample_layers.{stage}"
            h = ln_channels_first(h, sd[f"{d}.0.weight"], sd[f"{d}.0.bias"])
            h = F.conv3d(h, sd[f"{d}.1.weight"], sd[f"{d}.1.bias"], stride=2)
        for block in range(depths[stage]):
            b = f"{p}stages.{stage}.{block}"
            c = h.shape[1]
            w = sd[f"{b}.dwconv.weight"]
            y = F.conv3d(h, w, sd[f"{b}.dwconv.bias"], padding=w.shape[-1] // 2, groups=c)
            if arch == "repuxnet":
                y = F.batch_norm(
                    y, sd[f"{b}.norm.running_mean"], sd[f"{b}.norm.running_var"],
                    sd[f"{b}.norm.weight"], sd[f"{b}.norm.bias"], training=False, eps=1e-5,
                )
                h = F.gelu(y)
            else:
                y = ln_channels_first(y, sd[f"{b}.norm.weight"], sd[f"{b}.norm.bias"])
                y = F.gelu(F.conv3d(y, sd[f"{b}.pwconv1.weight"], sd[f"{b}.pwconv1.bias"], groups=c))
                y = F.conv3d(y, sd[f"{b}.pwconv2.weight"], sd[f"{b}.pwconv2.bias"], groups=c)
                h = h + y * sd[f"{b}.gamma"].view(1, -1, 1, 1, 1)
        skips.append(ln_channels_first(h, sd[f"{p}norm{stage}.weight"], sd[f"{p}norm{stage}.bias"]))
    enc1 = net.encoder1(x)
    enc2, enc3, enc4, hidden = (getattr(net, f"encoder{i + 2}")(skips[i]) for i in range(4))
    dec = net.decoder5(hidden, enc4)
    dec = net.decoder4(dec, enc3)
    dec = net.decoder3(dec, enc2)
    dec = net.decoder2(dec, enc1)
    return net.out(net.decoder1(dec))


# --- the published layout -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RepUXNet, UXNet])
def test_default_state_dict_equals_published_keys_shapes_and_order(cls):
    with torch.device("meta"):
        net = cls(in_chans=1, out_chans=5)
    got = [(key, list(value.shape)) for key, value in net.state_dict().items()]
    assert got == list(published_shapes(net.config["arch"]).items())


@pytest.mark.parametrize("arch", ["repuxnet", "uxnet"])
def test_published_default_checkpoint_loads_strictly_and_gives_its_config(arch):
    published = {key: torch.empty(shape, device="meta") for key, shape in published_shapes(arch).items()}
    config = config_from_state_dict(arch, published)
    assert config["in_chans"] == 1 and config["out_chans"] == 5
    assert {key: config[key] for key in PUBLISHED_DEFAULTS} == PUBLISHED_DEFAULTS
    assert config.get("ks") == (21 if arch == "repuxnet" else None)
    with torch.device("meta"):
        net = build_network(arch, **config)
    result = net.load_state_dict(published, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_paper_preset_is_the_published_repuxnet():
    preset = NETWORK_PRESETS["paper"]
    with torch.device("meta"):
        net = build_network(preset["arch"], **preset, out_chans=5)
    assert {key: list(value.shape) for key, value in net.state_dict().items()} == published_shapes("repuxnet")
    assert preset["a"] == 1.0


@pytest.mark.parametrize("arch", ["repuxnet", "uxnet"])
def test_torch_saved_raw_state_dict_loads_strictly_with_identical_outputs(arch, tmp_path):
    trained = tiny_net(arch, seed=0)
    path = tmp_path / "best_metric_model.pth"
    torch.save(trained.state_dict(), path)  # the published format: a bare state_dict
    loaded = torch.load(path, weights_only=True)
    assert all(key.startswith((PREFIX[arch], "encoder", "decoder", "out.")) for key in loaded)

    torch.manual_seed(1)
    fresh = build_network(arch, **config_from_state_dict(arch, loaded))
    fresh.load_state_dict(loaded, strict=True)
    fresh.eval()
    x = tiny_input(arch)
    with torch.no_grad():
        expected = trained(x)
        assert not torch.equal(build_network(arch, **TINY[arch]).eval()(x), expected)  # weights matter
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


# --- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["repuxnet", "uxnet"])
def test_forward_matches_spec_reimplementation(arch):
    net = tiny_net(arch)
    x = tiny_input(arch)
    with torch.no_grad():
        out = net(x)
        expected = reference_forward(arch, net, x)
    assert out.shape == (2, TINY[arch]["out_chans"], *TINY_INPUT)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_decoder2_merges_encoder1_output_at_full_resolution():
    net = tiny_net("repuxnet")
    seen = {}
    net.encoder1.register_forward_hook(lambda m, args, out: seen.__setitem__("encoder1", out))
    net.decoder2.register_forward_hook(lambda m, args, out: seen.__setitem__("decoder2", args))
    with torch.no_grad():
        net(tiny_input("repuxnet"))
    upsampled, skip = seen["decoder2"]
    assert skip is seen["encoder1"]
    assert upsampled.shape[2:] == (16, 8, 24) and skip.shape[2:] == TINY_INPUT


def test_forward_does_not_use_the_prior_alpha():
    net = tiny_net("repuxnet")
    other = build_network("repuxnet", **{**TINY["repuxnet"], "a": 3.0}).eval()
    other.load_state_dict(net.state_dict())
    assert net.prior_alpha == 0.5 and other.prior_alpha == 3.0 and other.config["a"] == 3.0
    x = tiny_input("repuxnet")
    with torch.no_grad():
        torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


def test_large_kernels_receive_gradients_in_training():
    net = tiny_net("repuxnet").train()
    net(tiny_input("repuxnet")).square().mean().backward()
    for name, conv in large_kernel_convs(net):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["repuxnet", "uxnet"])
@pytest.mark.parametrize("sides", [(32, 24, 32), (8, 16, 16), (16, 16, 17)])
def test_sides_not_multiple_of_16_raise_input_error(arch, sides):
    net = tiny_net(arch)
    x = torch.zeros(1, TINY[arch]["in_chans"], *sides)
    with pytest.raises(InputError) as error:
        net(x)
    assert str(tuple(x.shape)) in str(error.value) and "multiples of 16" in str(error.value)


def test_wrong_channel_count_or_rank_raise_input_error():
    net = tiny_net("uxnet")  # in_chans=2
    for shape in [(1, 1, 16, 16, 16), (1, 3, 16, 16, 16), (2, 16, 16, 16)]:
        with pytest.raises(InputError, match="expected \\(B, 2, D, H, W\\)") as error:
            net(torch.zeros(shape))
        assert str(shape) in str(error.value)


def test_small_preset_is_a_shippable_21_cubed_repuxnet():
    preset = NETWORK_PRESETS["small"]
    torch.manual_seed(0)
    net = build_network(preset["arch"], **preset, out_chans=5).eval()
    stored_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    assert stored_bytes < 10_000_000
    kernels = large_kernel_convs(net)
    assert len(kernels) == sum(preset["depths"]) and all(c.kernel_size == (21, 21, 21) for _, c in kernels)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 5, 32, 32, 32)


# --- building blocks ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: variance near eps, where its place shows
def test_channels_first_layer_norm_matches_layer_norm_over_channels(scale):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 3, 4, 6, generator=gen) + 2.0) * scale
    norm = ChannelsFirstLayerNorm(5, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5, generator=gen))
        norm.bias.copy_(torch.randn(5, generator=gen))
        expected = ln_channels_first(x, norm.weight, norm.bias, eps=1e-6)
        torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
        half = norm(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, rtol=1e-2, atol=1e-2)


def test_repux_block_is_depthwise_conv_batchnorm_gelu_without_residual():
    torch.manual_seed(0)
    block = randomized(RepUXBlock(6, kernel_size=5), seed=1)
    x = torch.randn(2, 6, 7, 8, 9)
    with torch.no_grad():
        y = F.conv3d(x, block.dwconv.weight, block.dwconv.bias, padding=2, groups=6)
        y = F.batch_norm(y, block.norm.running_mean, block.norm.running_var, block.norm.weight, block.norm.bias)
        torch.testing.assert_close(block(x), F.gelu(y), rtol=1e-5, atol=1e-6)
    assert block.dwconv.weight.shape == (6, 1, 5, 5, 5) and block.dwconv.bias is not None


def test_ux_block_grouped_mlp_and_layer_scale():
    torch.manual_seed(0)
    block = UXBlock(6)
    assert torch.all(block.gamma == 1e-6)
    assert block.pwconv1.weight.shape == (24, 1, 1, 1, 1) and block.pwconv2.weight.shape == (6, 4, 1, 1, 1)
    randomized(block, seed=2)
    x = torch.randn(2, 6, 7, 8, 9)
    with torch.no_grad():
        y = F.conv3d(x, block.dwconv.weight, block.dwconv.bias, padding=3, groups=6)
        y = ln_channels_first(y, block.norm.weight, block.norm.bias)
        # Grouped 1x1x1 convs: output channel o reads only input group o // (C_out / C).
        hidden = torch.einsum("bcdhw,co->bcodhw", y, block.pwconv1.weight.view(6, 4)).flatten(1, 2)
        hidden = F.gelu(hidden + block.pwconv1.bias.view(1, -1, 1, 1, 1))
        y = torch.einsum("bcodhw,co->bcdhw", hidden.view(2, 6, 4, 7, 8, 9), block.pwconv2.weight.view(6, 4))
        y = y + block.pwconv2.bias.view(1, -1, 1, 1, 1)
        torch.testing.assert_close(block(x), x + block.gamma.view(1, -1, 1, 1, 1) * y, rtol=1e-4, atol=1e-5)


# --- large kernels ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch, kernel", [("repuxnet", 21), ("uxnet", 7)])
def test_large_kernel_convs_are_the_block_depthwise_convs_of_the_default_network(arch, kernel):
    with torch.device("meta"):
        net = build_network(arch, out_chans=5)
    found = large_kernel_convs(net)
    depths = net.config["depths"]
    expected = [f"{PREFIX[arch]}stages.{s}.{b}.dwconv" for s in range(4) for b in range(depths[s])]
    assert [name for name, _ in found] == expected
    modules = dict(net.named_modules())
    stem = net.encoder.downsample_layers[0][0]
    for name, conv in found:
        assert conv is modules[name] and conv is not stem
        assert conv.kernel_size == (kernel,) * 3 and conv.groups == conv.in_channels == conv.out_channels
    if arch == "repuxnet":
        assert len(found) == 8


def test_large_kernel_convs_through_distributed_data_parallel(tmp_path):
    dist.init_process_group(
        "gloo", store=dist.FileStore(os.fspath(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        net = tiny_net("repuxnet")
        wrapped = DistributedDataParallel(net)
        found = large_kernel_convs(wrapped)
    finally:
        dist.destroy_process_group()
    assert [name for name, _ in found] == [f"module.{name}" for name, _ in large_kernel_convs(net)]
    assert len(found) == sum(TINY["repuxnet"]["depths"])
    assert all(conv is dict(wrapped.named_modules())[name] for name, conv in found)


# --- configs ----------------------------------------------------------------------------------

ROUND_TRIP_CONFIGS = [
    ("repuxnet", dict(out_chans=5)),
    ("repuxnet", dict(in_chans=2, out_chans=3, depths=(1, 3, 2, 1), feat_size=(4, 8, 12, 20), ks=7, hidden_size=24)),
    ("repuxnet", dict(out_chans=16, depths=(3, 1, 1, 1), feat_size=(8, 8, 16, 16), ks=3, res_block=False)),
    ("uxnet", dict(out_chans=5)),
    ("uxnet", dict(in_chans=3, out_chans=8, depths=(2, 2, 4, 2), feat_size=(6, 12, 18, 24), hidden_size=40)),
    ("uxnet", dict(out_chans=2, depths=(1, 1, 1, 1), feat_size=(4, 4, 8, 8), hidden_size=8, res_block=False)),
]


@pytest.mark.parametrize("arch, config", ROUND_TRIP_CONFIGS)
def test_config_from_state_dict_round_trip(arch, config):
    with torch.device("meta"):
        net = build_network(arch, **config)
        rebuilt_config = config_from_state_dict(arch, net.state_dict())
        assert rebuilt_config == net.config
        for key, value in config.items():
            assert rebuilt_config[key] == (list(value) if isinstance(value, tuple) else value)
        from_json = json.loads(json.dumps(net.config))
        rebuilt = build_network(from_json["arch"], **from_json)
    assert rebuilt.config == net.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_config_from_state_dict_rejects_other_layouts():
    with torch.device("meta"):
        ux = UXNet(out_chans=2, depths=(1, 1, 1, 1), feat_size=(4, 4, 8, 8), hidden_size=8).state_dict()
        rep = RepUXNet(out_chans=2, depths=(1, 1, 1, 1), feat_size=(4, 4, 8, 8), ks=5, hidden_size=8).state_dict()
    with pytest.raises(InputError, match="keys are those of a uxnet"):
        config_from_state_dict("repuxnet", ux)
    with pytest.raises(InputError, match="DistributedDataParallel"):
        config_from_state_dict("repuxnet", {f"module.{k}": v for k, v in rep.items()})
    missing = dict(rep)
    del missing["decoder3.conv_block.conv2.conv.weight"]
    with pytest.raises(InputError, match="missing decoder3.conv_block.conv2.conv.weight"):
        config_from_state_dict("repuxnet", missing)
    extra = {**rep, "repuxnet_3d.head.weight": torch.empty(3, device="meta")}
    with pytest.raises(InputError, match="unexpected repuxnet_3d.head.weight"):
        config_from_state_dict("repuxnet", extra)
    wrong = {**rep, "encoder3.layer.conv2.conv.weight": torch.empty(8, 8, 1, 3, 3, device="meta")}
    with pytest.raises(InputError, match="encoder3.layer.conv2.conv.weight has shape"):
        config_from_state_dict("repuxnet", wrong)
    big_kernel_ux = {**ux, "uxnet_3d.stages.0.0.dwconv.weight": torch.empty(4, 1, 9, 9, 9, device="meta")}
    with pytest.raises(InputError, match="9\\^3"):
        config_from_state_dict("uxnet", big_kernel_ux)
    with pytest.raises(InputError, match="repuxnet, uxnet"):
        config_from_state_dict("swinunetr", rep)


def test_build_network_errors_name_the_value_and_the_choices():
    assert set(ARCHITECTURES) == {"repuxnet", "uxnet"}
    with pytest.raises(InputError, match="'unetr'.*repuxnet, uxnet"):
        build_network("unetr")
    with pytest.raises(InputError, match="ks.*not accepted by uxnet"):
        build_network("uxnet", ks=21)
    with pytest.raises(InputError, match="arch='uxnet'"):
        build_network("repuxnet", arch="uxnet")
    bad = [
        dict(ks=20),
        dict(depths=(2, 2, 2)),
        dict(feat_size=(48, 96, 0, 384)),
        dict(spatial_dims=2),
        dict(a=0),
        dict(out_chans=2.5),
    ]
    for config in bad:
        (name, value), = config.items()
        with pytest.raises(InputError, match=re.escape(f"{name}={value!r}")):
            build_network("repuxnet", **config)
