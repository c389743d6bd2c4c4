"""repux.train's parts, each on its own: splits, cache, patch sampling, Dice, FFT kernels,
optimizer rules, output-head mapping, case preparation, checkpoints and options.

Expected values are worked out by hand in the tests (Dice of small maps, prior powers),
or come from an independent reference (torch's direct conv3d in float64, repux.infer's
preprocessing of the same image).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repux.bfr import frequency_prior
from repux.bundle import Label, label_preset
from repux.data.phantoms import make_phantom
from repux.errors import InputError
from repux.infer.preprocess import PreprocessingConfig, preprocess
from repux.network import build_network, large_kernel_convs
from repux.train.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from repux.train.config import TrainConfig
from repux.train.dataset import PatchSampler, VolumeCache
from repux.train.fft_conv import FFTDepthwiseConv3d, use_fft_kernels
from repux.train.model_setup import map_output_head
from repux.train.optimizers import make_optimizer, prepare_fresh_network
from repux.train.preprocessing import PreparedCase, prepare_case
from repux.train.splits import split_cases
from repux.train.validation import ValidationResult, dice_per_label

TINY = dict(feat_size=[4, 8, 16, 32], hidden_size=32, ks=9, out_chans=3)


def cases(n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(case_id=f"case_{i:02d}") for i in range(n)]


# ---- splits ---------------------------------------------------------------------------------
def test_fraction_split_is_reproducible_and_independent_of_listing_order():
    listed = cases(10)
    train, val = split_cases(listed, val_fraction=0.2, seed=4)
    assert len(val) == 2 and len(train) == 8
    assert {c.case_id for c in train} | {c.case_id for c in val} == {c.case_id for c in listed}
    shuffled = listed[::-1]
    train2, val2 = split_cases(shuffled, val_fraction=0.2, seed=4)
    assert [c.case_id for c in val2] == [c.case_id for c in val]
    _, val3 = split_cases(listed, val_fraction=0.2, seed=5)
    assert {c.case_id for c in val3} != {c.case_id for c in val} or len(listed) < 3


def test_folds_partition_the_cases():
    listed = cases(7)
    vals = [split_cases(listed, folds=3, fold=i, seed=1)[1] for i in range(3)]
    ids = [c.case_id for v in vals for c in v]
    assert sorted(ids) == sorted(c.case_id for c in listed)  # each case validates exactly once
    assert sorted(len(v) for v in vals) == [2, 2, 3]


def test_split_refuses_too_few_cases():
    with pytest.raises(InputError, match="at least 2 cases"):
        split_cases(cases(1), val_fraction=0.2)
    with pytest.raises(InputError, match="--folds 5 needs at least 5"):
        split_cases(cases(3), folds=5, fold=0)
    train, val = split_cases(cases(1), val_fraction=0.0)
    assert len(train) == 1 and val == []


# ---- cache and sampling ---------------------------------------------------------------------
def fake_case(value: float, side: int = 40) -> PreparedCase:
    image = torch.full((1, side, side, side), value)
    label = torch.zeros((1, side, side, side), dtype=torch.uint8)
    label[0, 10:20, 12:22, 14:24] = 1
    label[0, 25:30, 5:15, 20:30] = 2
    box = (slice(0, side),) * 3
    return PreparedCase(image, label, box)  # type: ignore[arg-type]


def test_cache_stays_within_its_byte_bound_and_drops_least_recently_used():
    made = []

    def load(case):
        made.append(case.case_id)
        return fake_case(float(len(made)))

    one = fake_case(0.0)
    per_case = one.image.numel() * 2 + one.label.numel()  # float16 image + uint8 label
    cache = VolumeCache(load, max_bytes=2 * per_case + 10)
    a, b, c = cases(3)
    cache.get(a), cache.get(b), cache.get(a)  # a is now the most recent
    assert cache.loads == 2 and cache.nbytes == 2 * per_case
    cache.get(c)  # evicts b, the least recently used
    assert cache.nbytes <= cache.max_bytes
    cache.get(a)
    assert cache.loads == 3
    cache.get(b)
    assert cache.loads == 4 and made == ["case_00", "case_01", "case_02", "case_01"]
    assert cache.get(a).image.dtype == torch.float32


def test_patches_depend_only_on_seed_iteration_and_rank():
    cache = VolumeCache(lambda case: fake_case(0.5 + int(case.case_id[-1]) / 10), max_bytes=10**8)
    listed = cases(4)
    sampler = PatchSampler(cache, listed, (16, 16, 16), batch_size=1, samples_per_volume=2, seed=7)
    images, labels = sampler.batch(5)
    assert images.shape == (2, 1, 16, 16, 16) and labels.shape == (2, 1, 16, 16, 16)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    again = PatchSampler(cache, listed, (16, 16, 16), batch_size=1, samples_per_volume=2, seed=7)
    sampler.batch(0)  # another iteration in between changes nothing
    images2, labels2 = again.batch(5)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    other, _ = again.batch(6)
    assert not torch.equal(other, images)


def test_ranks_draw_different_cases_and_an_epoch_visits_every_case_once():
    listed = cases(6)
    cache = VolumeCache(lambda case: fake_case(0.5), max_bytes=10**8)
    ranks = [PatchSampler(cache, listed, (16,) * 3, seed=3, rank=r, world_size=2) for r in range(2)]
    drawn = []
    for iteration in range(3):  # 3 steps x 2 ranks = one epoch of 6 cases
        pair = [ranks[r].case_for((iteration * 2 + r)).case_id for r in range(2)]
        assert pair[0] != pair[1]
        drawn += pair
    assert sorted(drawn) == sorted(c.case_id for c in listed)


# ---- Dice -------------------------------------------------------------------------------------
def test_dice_per_label_by_hand():
    truth = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0])
    dice = dice_per_label(pred, truth, 4)
    # label 0: truth {0,1,7}, pred {0,4,6,7}: overlap {0,7} -> 2*2/(3+4)
    # label 1: truth {2,3,4}, pred {1,2,3}: overlap 2 -> 4/6; label 2: truth {5,6}, pred {5} -> 2/3
    assert dice[:3] == pytest.approx([4 / 7, 4 / 6, 2 / 3])
    assert math.isnan(dice[3])  # in neither map

    result = ValidationResult(["a", "b"], np.array([[0.9, 0.5, np.nan], [0.7, 0.7, 0.2]]), ["background", "x", "y"])
    assert result.per_label == pytest.approx([0.8, 0.6, 0.2])
    assert result.mean == pytest.approx(0.4)  # organs only
    assert result.mean_with_background == pytest.approx((0.8 + 0.6 + 0.2) / 3)
    assert result.by_name() == pytest.approx({"x": 0.6, "y": 0.2})


# ---- FFT kernels --------------------------------------------------------------------------
def test_fft_kernels_give_the_direct_convolution_and_its_gradients():
    torch.manual_seed(0)
    net = build_network("repuxnet", **TINY)
    names = use_fft_kernels(net)
    assert names == [name for name, _ in large_kernel_convs(net)] and len(names) == 8
    conv = dict(large_kernel_convs(net))[names[0]]
    assert isinstance(conv, FFTDepthwiseConv3d)
    x = torch.randn(2, conv.in_channels, 12, 10, 14, requires_grad=True)
    grad_out = torch.randn(2, conv.in_channels, 12, 10, 14)
    fft_grads = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias)]
    reference = F.conv3d(*leaves, padding=4, groups=conv.groups)
    ref_grads = torch.autograd.grad(reference, leaves, grad_out.double())
    assert torch.allclose(conv(x).double(), reference, atol=1e-5 * reference.abs().max().item())
    for got, want in zip(fft_grads, ref_grads):
        assert torch.allclose(got.double(), want, atol=1e-5 * want.abs().max().item())
    # The same parameters under the same names: bundles and optimizer groups are unchanged.
    assert set(net.state_dict()) == set(build_network("repuxnet", **TINY).state_dict())


# ---- update rules -----------------------------------------------------------------------
def one_step(net, optimizer):
    x = torch.randn(1, 1, 32, 32, 32)
    optimizer.zero_grad()
    net(x).square().mean().backward()
    optimizer.step()


def test_frozen_kernels_emulate_the_published_code():
    torch.manual_seed(1)
    net = build_network("repuxnet", **TINY)
    prepare_fresh_network(net, "frozen-kernels", 1.0)  # the raw initial kernel V0
    name, conv = large_kernel_convs(net)[0]
    start = conv.weight.detach().clone()
    optimizer = make_optimizer(net, "frozen-kernels", lr=1e-2, alpha=1.0)
    for _ in range(3):
        one_step(net, optimizer)
    prior = frequency_prior(9, 1.0, dtype=torch.float64)
    assert torch.allclose(conv.weight.double(), start.double() * prior**3, rtol=1e-5, atol=1e-12)
    assert not any(p is conv.weight for group in optimizer.param_groups for p in group["params"])
    assert conv.weight[:, :, 4, 4, 4].equal(start[:, :, 4, 4, 4])  # the centre (m = 1) is all that survives


@pytest.mark.parametrize("rule", ["bfr-adamw", "adamw"])
def test_trained_rules_start_from_the_prior_scaled_kernel_and_update_it(rule):
    torch.manual_seed(2)
    raw = build_network("repuxnet", **TINY)
    torch.manual_seed(2)
    net = build_network("repuxnet", **TINY)
    prepare_fresh_network(net, rule, 1.0)
    _, conv = large_kernel_convs(net)[0]
    _, raw_conv = large_kernel_convs(raw)[0]
    prior = frequency_prior(9, 1.0)
    assert torch.allclose(conv.weight, raw_conv.weight * prior)
    before = conv.weight.detach().clone()
    optimizer = make_optimizer(net, rule, lr=1e-2)
    one_step(net, optimizer)
    assert not torch.equal(conv.weight, before)
    assert any(group.get("prior") is not None for group in optimizer.param_groups) == (rule == "bfr-adamw")


# ---- fine-tuning head ----------------------------------------------------------------------
def test_output_head_rows_follow_label_names():
    source_labels = label_preset("flare")  # background, spleen, kidney, liver, pancreas
    torch.manual_seed(3)
    source = build_network("repuxnet", **dict(TINY, out_chans=5))
    target_labels = [
        Label(0, "background", (0, 0, 0)),
        Label(1, "Liver", (221, 130, 101)),
        Label(2, "spleen", (157, 108, 162)),
        Label(3, "gallbladder", (139, 150, 98)),
    ]
    torch.manual_seed(4)
    target = build_network("repuxnet", **dict(TINY, out_chans=4))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        mapping = map_output_head(source.state_dict(), source_labels, target, target_labels)
    assert mapping == {"background": "background", "Liver": "liver", "spleen": "spleen", "gallbladder": None}
    new, old = target.state_dict(), source.state_dict()
    for key in ("out.conv.conv.weight", "out.conv.conv.bias"):
        assert torch.equal(new[key][0], old[key][0])
        assert torch.equal(new[key][1], old[key][3])  # liver was channel 3
        assert torch.equal(new[key][2], old[key][1])  # spleen was channel 1
        assert torch.equal(new[key][3], fresh[key][3])  # gallbladder: fresh initialisation
    body = [k for k in new if not k.startswith("out.")]
    assert body and all(torch.equal(new[k], old[k]) for k in body)


def test_head_mapping_refuses_another_network():
    source = build_network("repuxnet", **dict(TINY, out_chans=5))
    target = build_network("repuxnet", **dict(TINY, feat_size=[4, 8, 16, 24], out_chans=5))
    with pytest.raises(InputError, match="only the output head may differ"):
        map_output_head(source.state_dict(), label_preset("flare"), target, label_preset("flare21"))


# ---- preparing a case ----------------------------------------------------------------------
def test_prepared_case_matches_inference_preprocessing_and_keeps_the_organs():
    image, label = make_phantom(11, shape=(48, 44, 30))
    preprocessing = {
        "spacing": [6.0, 6.0, 6.0],
        "orientation": "RAS",
        "intensity": {"a_min": -125.0, "a_max": 275.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
        "patch_size": [32, 32, 32],
    }
    prepared = prepare_case(image, label, preprocessing)
    reference = preprocess(image, PreprocessingConfig.from_metadata(preprocessing))
    assert torch.equal(prepared.image, reference.image[0])
    assert prepared.label.shape == prepared.image.shape
    inside = np.zeros(prepared.label.shape[1:], dtype=bool)
    inside[prepared.box] = True
    assert not prepared.label[0][~torch.from_numpy(inside)].any()  # padding is background
    voxel_ml = np.prod(label.spacing) / 1000
    for value in range(1, 5):
        original = np.count_nonzero(label.array == value) * voxel_ml
        resampled = int((prepared.label == value).sum()) * 6.0**3 / 1000
        assert original > 0 and resampled == pytest.approx(original, rel=0.35), value


# ---- checkpoints and options ----------------------------------------------------------------
def test_checkpoint_round_trip_restores_generators(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path, {"iteration": 7, "rng": state, "model": {"w": torch.arange(3.0)}})
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = load_checkpoint(tmp_path)
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert loaded["iteration"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(3.0))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="checkpoint.pt: cannot be read"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"network": "small", "patch_size": 40}, "multiples of 16"),
        ({"network": "small", "patch_size": (16, 32, 32)}, "at least 32"),
        ({"network": "small", "optimizer": "sgd"}, "--optimizer 'sgd'"),
        ({}, "exactly one of --model"),
        ({"network": "small", "model": "demo"}, "exactly one of --model"),
        ({"network": "small", "folds": 5}, "--folds K and --fold i go together"),
        ({"network": "small", "folds": 5, "fold": 5}, "--fold 5; expected 0 to 4"),
        ({"network": "small", "val_fraction": 1.0}, "--val-fraction 1.0"),
        ({"network": "small", "spacing": (1.0, 2.0)}, "one or three numbers"),
        ({"network": "small", "iterations": 0}, "--iterations 0"),
    ],
)
def test_config_names_the_bad_option(tmp_path, options, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(data_dir=tmp_path, output=tmp_path / "out", **options)


def test_config_defaults_are_the_papers_recipe(tmp_path):
    config = TrainConfig(data_dir=tmp_path, output=tmp_path / "model", network="paper")
    assert (config.optimizer, config.lr, config.weight_decay) == ("bfr-adamw", 1e-4, 0.01)
    assert (config.batch_size, config.samples_per_volume, config.val_every) == (1, 2, 500)
    assert config.workdir == tmp_path / "model.work"
