"""The model catalog: shipped and user bundles, model cards, imports and version names."""

from __future__ import annotations

import json
import shutil

import pytest

from RepUXSegmentLib.catalog import MODELS_DIR_ENV, ModelCatalog, read_bundle_metadata, shipped_models_dir
from RepUXSegmentLib.logic import RepUXLogic


def test_user_models_are_listed_with_their_cards(catalog, tiny_bundle):
    entry = catalog.get("tiny")
    assert entry.source == "user"
    assert entry.path == catalog.user_dir / "tiny"
    card = entry.card()
    assert [label["name"] for label in card["labels"]] == ["spleen", "kidney", "liver", "pancreas"]
    assert card["labels"][2] == {"value": 3, "name": "liver", "color": [221, 130, 101]}
    assert card["spacing_mm"] == [8.0, 8.0, 8.0]
    assert card["patch_size"] == [32, 32, 32]
    assert card["validation_dice"] == {"liver": 0.25, "mean": 0.125}
    assert card["provenance"]["source"] == "Testing/module/conftest.py"
    text = entry.card_text()
    assert "3 liver" in text and "Validation Dice: liver 0.250, mean 0.125" in text and "8 x 8 x 8 mm" in text


def test_shipped_models_come_first_and_keep_their_names(tmp_path, tiny_bundle):
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_bundle, shipped / "demo")
    catalog = ModelCatalog(user_dir=tmp_path / "user", shipped_dir=shipped)
    catalog.add(tiny_bundle, "mine")
    shutil.copytree(tiny_bundle, catalog.user_dir / "demo")  # a user folder may not shadow "demo"
    assert [(e.name, e.source) for e in catalog.models()] == [("demo", "shipped"), ("mine", "user")]
    assert any("name of a shipped model" in problem for problem in catalog.problems)
    with pytest.raises(FileExistsError, match="'demo' already exists"):
        catalog.add(tiny_bundle, "demo")


def test_the_package_ships_its_models_where_the_catalog_looks():
    from repux.bundle import SHIPPED_MODELS_DIR

    assert shipped_models_dir().resolve() == SHIPPED_MODELS_DIR.resolve()


def test_broken_bundles_are_reported_not_listed(catalog):
    bad = catalog.user_dir / "bad"
    bad.mkdir()
    (bad / "model.json").write_text('{"format_version": 1, "name": "bad"')
    (catalog.user_dir / ".half-written.tmp-1234").mkdir()
    assert [e.name for e in catalog.models() if e.source == "user"] == ["tiny"]
    assert len(catalog.problems) == 1 and "bad/model.json" in catalog.problems[0] and "malformed JSON" in catalog.problems[0]


def test_a_bundle_folder_is_copied_in_and_names_are_checked(catalog, tiny_bundle, tmp_path):
    entry = RepUXLogic(scene=None, catalog=catalog).import_bundle(tiny_bundle, "copy-1")
    assert entry.path == catalog.user_dir / "copy-1"
    assert (entry.path / "model.safetensors").read_bytes() == (tiny_bundle / "model.safetensors").read_bytes()
    assert "copy-1" in catalog.names()
    for bad in ("../escape", "", "with space", ".hidden"):
        with pytest.raises(ValueError, match="model name"):
            catalog.add(tiny_bundle, bad)
    with pytest.raises(ValueError, match="not a folder"):
        catalog.add(tmp_path / "missing")
    with pytest.raises(ValueError, match="not in the catalog"):
        catalog.get("nope")


def test_any_bundle_folder_can_be_used_by_path(catalog, tiny_bundle):
    entry = catalog.get(str(tiny_bundle))
    assert entry.path == tiny_bundle.resolve()
    assert read_bundle_metadata(tiny_bundle).name == entry.metadata.name


def test_version_names_count_up(catalog, tiny_bundle):
    assert catalog.next_version_name("tiny") == "tiny-v2"
    catalog.add(tiny_bundle, "tiny-v2")
    assert catalog.next_version_name("tiny") == "tiny-v3"
    assert catalog.next_version_name("tiny-v2") == "tiny-v3"
    assert catalog.next_version_name("other-v7") == "other-v8"


def test_the_environment_variable_chooses_the_user_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "from-env"))
    assert ModelCatalog(user_dir=tmp_path / "from-settings").user_dir == (tmp_path / "from-env").resolve()
    monkeypatch.delenv(MODELS_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ModelCatalog().user_dir == (tmp_path / "home" / ".repux" / "models").resolve()


def test_a_published_checkpoint_is_imported_through_repux(catalog, tmp_path):
    """`.pth` -> `repux import-checkpoint` in a real process -> a new catalog entry."""
    import torch

    from repux.network import RepUXNet

    torch.manual_seed(1)
    network = RepUXNet(in_chans=1, out_chans=5, feat_size=(4, 8, 16, 32), hidden_size=32, ks=7)
    checkpoint = tmp_path / "published.pth"
    torch.save(network.state_dict(), checkpoint)
    entry = RepUXLogic(scene=None, catalog=catalog).import_checkpoint(checkpoint, "published", "repuxnet", "flare21")
    assert entry.name == "published" and entry.source == "user"
    assert [label.name for label in entry.labels] == ["background", "liver", "kidney", "spleen", "pancreas"]
    assert json.loads((entry.path / "model.json").read_text())["network"]["feat_size"] == [4, 8, 16, 32]
    assert "published" in catalog.names()
    with pytest.raises(FileExistsError):
        RepUXLogic(scene=None, catalog=catalog).import_checkpoint(checkpoint, "published", "repuxnet", "flare21")


def test_demo_card_says_it_is_for_synthetic_phantoms_only(tmp_path):
    entry = ModelCatalog(user_dir=tmp_path / "user").get("demo")
    assert "synthetic phantoms only" in entry.card()["usage_warning"]
    first_lines = entry.card_text().splitlines()[:2]
    assert any(line.startswith("WARNING: ") and "not for real scans" in line for line in first_lines), first_lines
