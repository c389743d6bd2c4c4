"""Fixtures for the module's GUI-free logic on a real MRML scene (the slicer-core wheel).

Models are tiny RepUX-Nets saved with the package's own ``save_bundle`` (random weights:
these tests check plumbing, geometry and metadata, not accuracy); volumes are the package's
synthetic phantoms written as real NIfTI files and loaded the way Slicer loads them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from module_helpers import PHANTOM_SHAPE, save_tiny_bundle

import slicer
from repux.imageio import write_volume


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return save_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def catalog(tmp_path, tiny_bundle):
    """A catalog whose user folder holds the tiny model (as "tiny")."""
    from RepUXSegmentLib.catalog import ModelCatalog

    catalog = ModelCatalog(user_dir=tmp_path / "models")
    catalog.add(tiny_bundle, "tiny")
    return catalog


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Phantom image and label files: "oblique" (tilted, axes PIL: permuted, not
    RAS and left-handed, so MRML reverses its last axis) and "ras" (axis-aligned RAS)."""
    from repux.data.phantoms import make_phantom

    folder = tmp_path_factory.mktemp("phantoms")
    files = {}
    for kind, seed, options in (("oblique", 3, {"orientation": "PIL", "oblique": True}), ("ras", 4, {"orientation": "RAS", "oblique": False})):
        image, label = make_phantom(seed, shape=PHANTOM_SHAPE, **options)
        files[kind] = (write_volume(image, folder / f"{kind}_image.nii.gz"), write_volume(label, folder / f"{kind}_label.nii.gz"))
    return files


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()
