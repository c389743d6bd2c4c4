"""repux.bundle: label presets and terminology, model.json, saving and strict loading of bundles."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import repux
import repux.bundle.store
from repux.bundle import (
    DICOM_MASTER_CONTEXT,
    BundleError,
    BundleMetadata,
    Label,
    label_preset,
    labels_from_json,
    load_bundle,
    save_bundle,
)
from repux.bundle.errors import JsonFields
from repux.errors import InputError
from repux.network import build_network

# Copied from spec/TERMINOLOGY.md ("How a segment carries it"): the liver's TerminologyEntry,
# and the same for the left kidney (type Kidney, modifier SCT^7771000^Left).
LIVER_ENTRY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)
LEFT_KIDNEY_ENTRY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^"
)

# The table of spec/TERMINOLOGY.md: organ -> (type code, type meaning, modifier code, RGB).
SPEC_TERMINOLOGY: dict[str, tuple[str, str, str | None, tuple[int, int, int] | None]] = {
    "liver": ("10200004", "Liver", None, (221, 130, 101)),
    "spleen": ("78961009", "Spleen", None, (157, 108, 162)),
    "kidney": ("64033007", "Kidney", None, (185, 102, 83)),
    "right kidney": ("64033007", "Kidney", "24028007", (185, 102, 83)),
    "left kidney": ("64033007", "Kidney", "7771000", (185, 102, 83)),
    "pancreas": ("15776009", "Pancreas", None, (249, 180, 111)),
    "gallbladder": ("28231008", "Gallbladder", None, (139, 150, 98)),
    "esophagus": ("32849002", "Esophagus", None, (211, 171, 143)),
    "stomach": ("69695003", "Stomach", None, (216, 132, 105)),
    "aorta": ("15825003", "Aorta", None, (224, 97, 76)),
    "inferior vena cava": ("64131007", "Inferior vena cava", None, None),
    "right adrenal gland": ("23451007", "Adrenal gland", "24028007", (249, 186, 150)),
    "left adrenal gland": ("23451007", "Adrenal gland", "7771000", (249, 186, 150)),
    "duodenum": ("38848004", "Duodenum", None, (255, 253, 229)),
    "urinary bladder": ("89837001", "Bladder", None, (222, 154, 132)),
    "prostate": ("41216001", "Prostate", None, (230, 158, 140)),
}

# Label orders of spec/ORIGINAL_REPUXNET.md ("Label maps").
SPEC_ORDERS = {
    "flare": ["spleen", "kidney", "liver", "pancreas"],
    "flare21": ["liver", "kidney", "spleen", "pancreas"],
    "amos": [
        "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
        "inferior vena cava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum",
        "urinary bladder", "prostate/uterus",
    ],
}  # fmt: skip

TINY = {"feat_size": [4, 8, 12, 16], "hidden_size": 16}


def tiny_network(arch: str = "repuxnet", out_chans: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"ks": 5} if arch == "repuxnet" else {}
    network = build_network(arch, in_chans=1, out_chans=out_chans, **TINY, **extra)
    # Non-default running statistics, so a loader that ignored buffers would be caught.
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    return network


def metadata_for(network: torch.nn.Module, preset: str = "flare") -> BundleMetadata:
    config = dict(network.config)
    arch = config.pop("arch")
    return BundleMetadata(
        name="tiny",
        architecture=arch,
        network=config,
        labels=label_preset(preset),
        description="a test bundle",
        provenance={"source": "unit test", "seed": 0, "iterations": 3, "validation_dice": {"liver": 0.5}},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    network = tiny_network()
    folder = tmp_path_factory.mktemp("saved") / "bundle"
    save_bundle(network, metadata_for(network), folder)
    return folder, network


def copy_bundle(saved_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("model.json", "model.safetensors"):
        (folder / name).write_bytes((saved_folder / name).read_bytes())
    return folder


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["repuxnet", "uxnet"])
def test_round_trip_keeps_weights_metadata_and_outputs(tmp_path: Path, arch: str) -> None:
    network = tiny_network(arch).eval()
    metadata = metadata_for(network)
    folder = save_bundle(network, metadata, tmp_path / "bundle")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    # Both files equally readable: a bundle is meant to be shared.
    assert (folder / "model.safetensors").stat().st_mode == (folder / "model.json").stat().st_mode

    bundle = load_bundle(folder)
    assert bundle.metadata == metadata
    assert json.loads((folder / "model.json").read_text()) == metadata.to_json()
    original = network.state_dict()
    loaded = bundle.state_dict()
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key

    rebuilt = bundle.build_network()
    assert not rebuilt.training
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), network(x))


def test_built_network_owns_its_weights_and_trains(tmp_path: Path, saved: tuple[Path, Any]) -> None:
    # The network is built on the meta device and takes the file's tensors: they must be its
    # own (training it never changes the bundle) and trainable.
    bundle = load_bundle(copy_bundle(saved[0], tmp_path))
    network = bundle.build_network()
    assert all(p.requires_grad and p.device.type == "cpu" for p in network.parameters())
    before = bundle.state_dict()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(value, bundle.state_dict()[key]) for key, value in before.items())


def test_a_network_tensor_the_weights_do_not_hold_is_an_error(
    tmp_path: Path, saved: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A buffer outside the state_dict (persistent=False) would stay on the meta device, without values.
    def with_extra_buffer(arch: str, **config: Any) -> torch.nn.Module:
        network = build_network(arch, **config)
        network.register_buffer("scratch", torch.zeros(3), persistent=False)
        return network

    monkeypatch.setattr(repux.bundle.store, "build_network", with_extra_buffer)
    with pytest.raises(BundleError, match="no values for scratch"):
        load_bundle(saved[0]).build_network()


def test_float16_bundle_is_smaller_and_loads_as_float32(tmp_path: Path, saved: tuple[Path, Any]) -> None:
    folder32, network = saved
    folder16 = save_bundle(network, metadata_for(network), tmp_path / "half", weights_dtype="float16")
    key = "repuxnet_3d.stages.0.0.dwconv.weight"
    with safe_open(str(folder16 / "model.safetensors"), framework="pt") as weights:
        assert weights.get_slice(key).get_dtype() == "F16"
    size16 = (folder16 / "model.safetensors").stat().st_size
    assert size16 < 0.6 * (folder32 / "model.safetensors").stat().st_size
    loaded = load_bundle(folder16).state_dict()
    for name, value in network.state_dict().items():
        if value.is_floating_point():
            assert loaded[name].dtype == torch.float32
            assert torch.equal(loaded[name], value.half().float()), name
        else:
            assert torch.equal(loaded[name], value), name


def test_float16_refuses_weights_beyond_its_range(tmp_path: Path) -> None:
    network = tiny_network()
    with torch.no_grad():
        network.out.conv.conv.bias.fill_(1e6)
    with pytest.raises(BundleError, match="out.conv.conv.bias.*float16.*float32"):
        save_bundle(network, metadata_for(network), tmp_path / "half", weights_dtype="float16")
    assert not (tmp_path / "half").exists()


# --- saving -----------------------------------------------------------------------------------


def test_save_never_overwrites_without_force(tmp_path: Path) -> None:
    first, second = tiny_network(seed=1), tiny_network(seed=2)
    folder = save_bundle(first, metadata_for(first), tmp_path / "bundle")
    with pytest.raises(FileExistsError, match="bundle.*already exists.*--force"):
        save_bundle(second, metadata_for(second), folder)
    assert torch.equal(load_bundle(folder).state_dict()["out.conv.conv.weight"], first.out.conv.conv.weight)

    save_bundle(second, metadata_for(second), folder, force=True)
    assert torch.equal(load_bundle(folder).state_dict()["out.conv.conv.weight"], second.out.conv.conv.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_force_never_replaces_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    network = tiny_network()
    folder = tmp_path / "my documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a bundle folder.*even with --force"):
        save_bundle(network, metadata_for(network), folder, force=True)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_save_refuses_metadata_of_another_network(tmp_path: Path) -> None:
    network = tiny_network()
    metadata = metadata_for(tiny_network(out_chans=16), preset="amos")
    with pytest.raises(ValueError, match="out_chans': 16.*out_chans': 5"):
        save_bundle(network, metadata, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_save_checks_metadata_like_load(tmp_path: Path) -> None:
    network = tiny_network()
    metadata = metadata_for(network)
    metadata.inference = {"overlap": 1.5, "sw_batch_size": 4, "blend": "constant"}
    with pytest.raises(BundleError, match=r"bundle/model.json: key 'inference.overlap': expected .*< 1, got 1.5"):
        save_bundle(network, metadata, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


# --- refusals on load: model.json -------------------------------------------------------------


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(path: list) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


JSON_REFUSALS = {
    "unknown architecture": (_set(["architecture"], "convnext"), r"key 'architecture': expected one of repuxnet, uxnet, got 'convnext'"),
    "newer format": (_set(["format_version"], 2), r"key 'format_version': expected 1 or lower, got 2.*upgrade repux"),
    "format not an int": (_set(["format_version"], "1"), r"key 'format_version': expected an integer >= 1, got '1'"),
    "missing key": (_delete(["preprocessing", "spacing"]), r"key 'preprocessing.spacing' is missing \(expected 3 positive numbers"),
    "missing top key": (_delete(["labels"]), r"key 'labels' is missing"),
    "wrong type": (_set(["inference", "sw_batch_size"], "4"), r"key 'inference.sw_batch_size': expected an integer >= 1, got '4'"),
    "bool as int": (_set(["inference", "sw_batch_size"], True), r"key 'inference.sw_batch_size': expected an integer"),
    "misspelt key": (_set(["inference", "overlapp"], 0.5), r"unknown key 'inference.overlapp' \(expected only overlap, sw_batch_size, blend\)"),
    "negative spacing": (_set(["preprocessing", "spacing"], [1.0, -1.0, 1.2]), r"key 'preprocessing.spacing': expected 3 positive numbers"),
    "patch not multiple of 16": (_set(["preprocessing", "patch_size"], [96, 96, 100]), r"key 'preprocessing.patch_size': expected 3 positive integers, multiples of 16"),
    "empty window": (_set(["preprocessing", "intensity", "a_max"], -200), r"key 'preprocessing.intensity.a_max': expected a number greater than a_min"),
    "bad orientation": (_set(["preprocessing", "orientation"], "RRS"), r"key 'preprocessing.orientation': expected 3 axis letters"),
    "unknown blend": (_set(["inference", "blend"], "max"), r"key 'inference.blend': expected one of constant, gaussian, got 'max'"),
    "modality": (_set(["modality"], "MR"), r"key 'modality': expected one of CT, got 'MR'"),
    "too few labels": (lambda d: d["labels"].pop(), r"key 'labels': expected label values exactly 0..4 .*output channel.*: 5\), got values \[0, 1, 2, 3\]"),
    "label value gap": (_set(["labels", 4, "value"], 7), r"key 'labels': expected label values exactly 0..4 .*got values \[0, 1, 2, 3, 7\]"),
    "repeated name": (_set(["labels", 2, "name"], "spleen"), r"key 'labels': expected distinct label names, got \['spleen'\]"),
    "colour range": (_set(["labels", 1, "color"], [300, 0, 0]), r"key 'labels\[1\].color': expected 3 integers 0..255 \(RGB\), got \[300, 0, 0\]"),
    "code with separator": (_set(["labels", 3, "terminology", "type", "meaning"], "Li~ver"), r"key 'labels\[3\].terminology.type.meaning': expected a non-empty string without '~'"),
    "network not an object": (_set(["network"], [1, 5]), r"key 'network': expected a JSON object, got \[1, 5\]"),
    "network arg invalid": (_set(["network", "feat_size"], [4, 8, 12]), r"key 'network': not a valid repuxnet config: .*feat_size"),
    "network arg unknown": (_set(["network", "width"], 3), r"key 'network': not a valid repuxnet config: .*width"),
    "network arch differs": (_set(["network", "arch"], "uxnet"), r"key 'network.arch': expected 'repuxnet'"),
    "in_chans": (_set(["network", "in_chans"], 2), r"key 'network.in_chans': expected 1 \(one CT channel\), got 2"),
    "dice of unknown label": (_set(["provenance", "validation_dice"], {"heart": 0.9}), r"unknown key 'provenance.validation_dice.heart'"),
    "dice above 1": (_set(["provenance", "validation_dice"], {"liver": 1.5}), r"key 'provenance.validation_dice.liver': expected a Dice score 0..1"),
    "sha256": (_set(["provenance", "source_sha256"], "abc"), r"key 'provenance.source_sha256': expected 64 hexadecimal digits"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(JSON_REFUSALS))
def test_load_refuses_bad_model_json(tmp_path: Path, saved: tuple[Path, Any], case: str) -> None:
    folder = copy_bundle(saved[0], tmp_path)
    edit, message = JSON_REFUSALS[case]
    data = json.loads((folder / "model.json").read_text())
    edit(data)
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"^{re.escape(str(folder / 'model.json'))}: .*{message}") as caught:
        load_bundle(folder)
    assert isinstance(caught.value, InputError)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"format_version": 1,', r"malformed JSON at line 1, column 22"),
        ('{"format_version": NaN}', r"NaN is not a valid JSON number"),
        ("[1, 2]", r"top level: expected a JSON object, got \[1, 2\]"),
        (b"\xff\xfe{}", r"not UTF-8 text"),
    ],
)
def test_load_refuses_unparsable_model_json(tmp_path: Path, saved: tuple[Path, Any], text: Any, message: str) -> None:
    folder = copy_bundle(saved[0], tmp_path)
    path = folder / "model.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BundleError, match=f"^{re.escape(str(path))}: {message}"):
        load_bundle(folder)


# --- refusals on load: weights ----------------------------------------------------------------


def _rewrite_weights(folder: Path, edit: Callable[[dict], None]) -> Path:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return path


WEIGHT_REFUSALS = {
    "missing": (
        lambda t: t.pop("out.conv.conv.bias"),
        r"weights do not match the repuxnet network of .*model.json: missing 'out.conv.conv.bias'",
    ),
    "extra": (
        lambda t: t.update({"head.weight": torch.zeros(3)}),
        r"weights do not match the repuxnet network of .*model.json: unexpected 'head.weight'",
    ),
    "mis-shaped": (
        lambda t: t.update({"out.conv.conv.weight": torch.zeros(6, 4, 1, 1, 1)}),
        r"weight 'out.conv.conv.weight': expected shape \[5, 4, 1, 1, 1\] \(from the network in .*model.json\), "
        r"got \[6, 4, 1, 1, 1\]",
    ),
    "integer kind": (
        lambda t: t.update({"out.conv.conv.bias": torch.zeros(5, dtype=torch.int32)}),
        r"weight 'out.conv.conv.bias': expected a floating-point tensor",
    ),
}


@pytest.mark.parametrize("case", list(WEIGHT_REFUSALS))
def test_load_refuses_weights_that_do_not_fit(tmp_path: Path, saved: tuple[Path, Any], case: str) -> None:
    folder = copy_bundle(saved[0], tmp_path)
    edit, message = WEIGHT_REFUSALS[case]
    path = _rewrite_weights(folder, edit)
    with pytest.raises(BundleError, match=f"^{re.escape(str(path))}: {message}"):
        load_bundle(folder)


def test_load_refuses_missing_or_unreadable_weights(tmp_path: Path, saved: tuple[Path, Any]) -> None:
    folder = copy_bundle(saved[0], tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BundleError, match=f"^{re.escape(str(weights))}: not a readable safetensors file"):
        load_bundle(folder)
    weights.unlink()
    with pytest.raises(BundleError, match=f"^{re.escape(str(weights))}: file not found \\(expected the bundle's weights"):
        load_bundle(folder)
    (folder / "model.json").unlink()
    with pytest.raises(BundleError, match=f"^{re.escape(str(folder / 'model.json'))}: file not found"):
        load_bundle(folder)


def test_load_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"^{re.escape(str(tmp_path / 'nothing'))}: no such bundle folder"):
        load_bundle(tmp_path / "nothing")


def test_demo_resolves_to_the_shipped_models_folder(
    tmp_path: Path, saved: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder called "demo" here
    monkeypatch.setattr(repux.bundle.store, "SHIPPED_MODELS_DIR", tmp_path / "models")
    with pytest.raises(BundleError, match=r"demo: the demo model is not installed \(expected the folder .*models/demo\)"):
        load_bundle("demo")
    demo = tmp_path / "models" / "demo"
    demo.mkdir(parents=True)
    for name in ("model.json", "model.safetensors"):
        (demo / name).write_bytes((saved[0] / name).read_bytes())
    bundle = load_bundle("demo")
    assert bundle.path == demo and bundle.metadata.name == "tiny"


def test_demo_name_points_into_the_package() -> None:
    assert repux.bundle.store.SHIPPED_MODELS_DIR == Path(repux.__file__).resolve().parent / "models"


# --- labels and terminology -------------------------------------------------------------------


def test_terminology_entries_match_slicer_examples() -> None:
    by_name = {label.name: label for label in label_preset("amos")}
    assert by_name["liver"].terminology_entry() == LIVER_ENTRY
    assert by_name["left kidney"].terminology_entry() == LEFT_KIDNEY_ENTRY
    # The IVC is only in the DICOM master list, so its entry names that context.
    assert by_name["inferior vena cava"].terminology_entry().split("~")[0] == (
        "Segmentation category and type - DICOM master list"
    )
    assert by_name["inferior vena cava"].context == DICOM_MASTER_CONTEXT
    with pytest.raises(ValueError, match="label 0 .*background.* no terminology"):
        by_name["background"].terminology_entry()


@pytest.mark.parametrize("preset", list(SPEC_ORDERS))
def test_presets_follow_the_spec_orders_and_slicer_codes(preset: str) -> None:
    labels = label_preset(preset)
    assert [label.value for label in labels] == list(range(len(SPEC_ORDERS[preset]) + 1))
    assert labels[0].name == "background" and not labels[0].has_terminology
    assert [label.name for label in labels[1:]] == SPEC_ORDERS[preset]
    for label in labels[1:]:
        organ = "prostate" if label.name == "prostate/uterus" else label.name
        type_value, meaning, modifier, color = SPEC_TERMINOLOGY[organ]
        assert (label.category.scheme, label.category.value, label.category.meaning) == (
            "SCT", "123037004", "Anatomical Structure",
        )  # fmt: skip
        assert (label.type.scheme, label.type.value, label.type.meaning) == ("SCT", type_value, meaning)
        assert (label.modifier.value if label.modifier else None) == modifier
        if color is not None:
            assert label.color == color, label.name


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(BundleError, match="unknown label preset 'kits'.*flare, flare21, amos"):
        label_preset("kits")


def _label_file(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    return path


def test_labels_from_json_reads_the_documented_format(tmp_path: Path) -> None:
    path = _label_file(
        tmp_path,
        {
            "description": "two organs",
            "labels": [
                {"value": 0, "name": "background", "color": [0, 0, 0]},
                {"value": 2, "name": "tumour", "color": [255, 0, 0]},
                {
                    "value": 1,
                    "name": "liver",
                    "color": [221, 130, 101],
                    "terminology": {
                        "category": {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"},
                        "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
                    },
                },
            ],
        },
    )
    labels = labels_from_json(path)
    assert [(label.value, label.name, label.color) for label in labels] == [
        (0, "background", (0, 0, 0)),
        (2, "tumour", (255, 0, 0)),
        (1, "liver", (221, 130, 101)),
    ]
    assert not labels[1].has_terminology
    assert labels[2].terminology_entry() == LIVER_ENTRY
    assert labels[2] == Label.from_json(JsonFields(labels[2].to_json(), "x"))


LABEL_FILE_REFUSALS = {
    "list at top": ([{"value": 0}], r"top level: expected a JSON object"),
    "unknown top key": ({"labels": [], "colours": {}}, r"unknown key 'colours'"),
    "no labels key": ({"description": "x"}, r"key 'labels' is missing"),
    "gap": (
        {"labels": [{"value": 0, "name": "bg", "color": [0, 0, 0]}, {"value": 2, "name": "a", "color": [1, 2, 3]}]},
        r"key 'labels': expected label values exactly 0..1 \(0 = background\), got values \[0, 2\]",
    ),
    "duplicate value": (
        {"labels": [{"value": 0, "name": "bg", "color": [0, 0, 0]}, {"value": 0, "name": "a", "color": [1, 2, 3]}]},
        r"expected label values exactly 0..1 .*got values \[0, 0\]",
    ),
    "only background": ({"labels": [{"value": 0, "name": "bg", "color": [0, 0, 0]}]}, r"exactly 0..0"),
    "missing name": ({"labels": [{"value": 0, "color": [0, 0, 0]}]}, r"key 'labels\[0\].name' is missing"),
    "negative value": ({"labels": [{"value": -1, "name": "a", "color": [0, 0, 0]}]}, r"'labels\[0\].value': expected an integer >= 0"),
    "colour as text": ({"labels": [{"value": 0, "name": "a", "color": "red"}]}, r"'labels\[0\].color': expected 3 integers 0..255"),
    "type without category": (
        {"labels": [{"value": 0, "name": "a", "color": [0, 0, 0], "terminology": {"type": {"scheme": "SCT", "value": "1", "meaning": "x"}}}]},
        r"key 'labels\[0\].terminology.category' is missing",
    ),
    "code missing meaning": (
        {"labels": [{"value": 0, "name": "a", "color": [0, 0, 0], "terminology": {
            "category": {"scheme": "SCT", "value": "1"}, "type": {"scheme": "SCT", "value": "1", "meaning": "x"}}}]},
        r"key 'labels\[0\].terminology.category.meaning' is missing",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LABEL_FILE_REFUSALS))
def test_labels_from_json_refusals(tmp_path: Path, case: str) -> None:
    data, message = LABEL_FILE_REFUSALS[case]
    path = _label_file(tmp_path, data)
    with pytest.raises(BundleError, match=f"^{re.escape(str(path))}: .*{message}"):
        labels_from_json(path)


def test_labels_from_json_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"^{re.escape(str(tmp_path / 'none.json'))}: file not found"):
        labels_from_json(tmp_path / "none.json")
