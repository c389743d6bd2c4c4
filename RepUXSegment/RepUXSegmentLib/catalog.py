"""The models a user can pick: bundles shipped in the package and bundles in the user's folder.

A bundle is a folder with ``model.json`` and ``model.safetensors`` (see ``repux.bundle``).
The catalog reads only ``model.json`` (no torch in the GUI process); the weights are checked
by the ``repux`` process that uses them.

- Shipped: ``repux/models/<name>`` inside the installed package (``demo``).
- User folder: ``$REPUX_MODELS_DIR``, else the folder the caller passes (the module passes
  its setting), else ``~/.repux/models`` (:func:`repux.hub.folders.models_dir`, the folder
  ``repux models`` uses too). Downloaded and imported published models, imported bundles
  and retrained versions are stored there, one folder per model; the folder name is the
  model's catalog name.
- Available: published models of the registry (:mod:`repux.hub.registry`) not installed
  yet, with their download size; :meth:`ModelCatalog.available` lists them.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repux.atomic import atomic_dir
from repux.bundle.card import model_card
from repux.bundle.errors import BundleError
from repux.bundle.labels import Label, read_json_file
from repux.bundle.metadata import BundleMetadata
from repux.errors import InputError
from repux.hub.folders import DEFAULT_USER_MODELS_DIR, MODELS_DIR_ENV, WORK_SUFFIX, models_dir
from repux.hub.listing import bundle_folders, shipped_models_dir
from repux.hub.registry import PublishedModel, load_registry

__all__ = ["DEFAULT_USER_MODELS_DIR", "MODELS_DIR_ENV", "WORK_SUFFIX", "ModelCatalog", "ModelEntry", "read_bundle_metadata", "shipped_models_dir"]

MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
SHIPPED, USER = "shipped", "user"

_VERSION_SUFFIX = re.compile(r"-v(\d+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_bundle_metadata(folder: str | os.PathLike) -> BundleMetadata:
    """Read and check a bundle folder's ``model.json``; the weights file must exist.

    Raises:
        BundleError: not a bundle folder, or ``model.json`` is malformed (message names the file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a folder (expected a bundle folder with {MODEL_JSON} and {WEIGHTS_FILE})")
    json_path = folder / MODEL_JSON
    metadata = BundleMetadata.from_json(read_json_file(json_path), str(json_path))
    if not (folder / WEIGHTS_FILE).is_file():
        raise BundleError(f"{folder / WEIGHTS_FILE}: file not found (expected the bundle's weights)")
    return metadata


@dataclass(frozen=True)
class ModelEntry:
    """One model of the catalog: its catalog ``name``, bundle ``path``, ``source`` and metadata."""

    name: str
    path: Path
    source: str
    metadata: BundleMetadata

    @property
    def labels(self) -> list[Label]:
        return self.metadata.labels

    def card(self) -> dict[str, Any]:
        """What the module shows about the model (see :func:`repux.bundle.card.model_card`)."""
        return model_card(self.name, self.path, self.source, self.metadata)

    def card_text(self) -> str:
        """The card as a few lines of plain text."""
        card = self.card()
        lines = [f"{card['name']} ({card['source']}, {card['architecture']})"]
        if card["usage_warning"]:
            lines.append(f"WARNING: {card['usage_warning']}")
        if card["description"]:
            lines.append(card["description"])
        lines.append("Labels: " + ", ".join(f"{item['value']} {item['name']}" for item in card["labels"]))
        lines.append("Spacing: " + " x ".join(f"{s:g}" for s in card["spacing_mm"]) + " mm (RAS)")
        lines.append("Patch: " + " x ".join(str(p) for p in card["patch_size"]) + " voxels")
        dice = card["validation_dice"]
        if dice:
            lines.append("Validation Dice: " + ", ".join(f"{name} {value:.3f}" for name, value in dice.items()))
        for key in ("source", "training_data", "iterations", "base_model", "created"):
            if key in card["provenance"]:
                lines.append(f"{key.replace('_', ' ').capitalize()}: {card['provenance'][key]}")
        return "\n".join(lines)


class ModelCatalog:
    """Shipped bundles plus the bundles in the user's model folder.

    Args:
        user_dir: the user's model folder; ``$REPUX_MODELS_DIR`` takes precedence, the
            default is ``~/.repux/models``. Created when a model is first added.
        shipped_dir: folder of shipped bundles (default: ``repux/models`` in the package).

    Attributes:
        problems: "folder: reason" for each folder in the user's folder that is not a usable
            bundle (filled by :meth:`models`; such folders are left out, not deleted).
    """

    def __init__(self, user_dir: str | os.PathLike | None = None, shipped_dir: str | os.PathLike | None = None) -> None:
        self.user_dir = models_dir(user_dir)
        self.shipped_dir = Path(shipped_dir) if shipped_dir is not None else shipped_models_dir()
        self.problems: list[str] = []

    def _scan(self, folder: Path | None, source: str) -> list[ModelEntry]:
        entries = []
        # Hidden folders (unfinished writes, partial downloads) and "NAME.work" (checkpoints of
        # a cancelled training run) are left out.
        for child in bundle_folders(folder):
            try:
                entries.append(ModelEntry(child.name, child.resolve(), source, read_bundle_metadata(child)))
            except InputError as error:
                self.problems.append(f"{child}: {error}")
        return entries

    def models(self) -> list[ModelEntry]:
        """Every usable model: shipped first, then the user's, each sorted by name."""
        self.problems = []
        shipped = self._scan(self.shipped_dir, SHIPPED)
        taken = {entry.name for entry in shipped}
        user = []
        for entry in self._scan(self.user_dir, USER):
            if entry.name in taken:
                self.problems.append(f"{entry.path}: has the name of a shipped model; rename the folder to use it")
            else:
                user.append(entry)
        return shipped + user

    def names(self) -> list[str]:
        return [entry.name for entry in self.models()]

    def available(self) -> list[PublishedModel]:
        """Published models that can be downloaded and are not installed (nor shipped) yet.

        Each has ``size_text`` ("size unknown" where the authors publish none) and
        ``card_text()``; the registry is :mod:`repux.hub.registry`'s (``$REPUX_REGISTRY``).
        """
        taken = {entry.name for entry in self.models()} | {path.name for path in bundle_folders(self.user_dir)}
        return [model for model in load_registry().models if model.importable and model.name not in taken]

    def published(self, name: str) -> PublishedModel:
        """The registry entry ``name`` (raises InputError naming the registry's models)."""
        return load_registry().get(name)

    def get(self, model: "str | os.PathLike | ModelEntry") -> ModelEntry:
        """A model by catalog name, or any bundle folder given as a path.

        Raises:
            InputError: no such model (the message lists the catalog's names).
        """
        if isinstance(model, ModelEntry):
            return model
        for entry in self.models():
            if entry.name == str(model):
                return entry
        path = Path(model).expanduser()
        if path.is_dir():
            return ModelEntry(path.name, path.resolve(), USER if self._in_user_dir(path) else "folder", read_bundle_metadata(path))
        raise InputError(
            f"model {str(model)!r}: not in the catalog and not a bundle folder; "
            f"expected one of {self.names() or ['(no models installed)']} or a folder with {MODEL_JSON}"
        )

    def _in_user_dir(self, path: Path) -> bool:
        return path.resolve().parent == self.user_dir

    def check_new_name(self, name: str) -> str:
        """Refuse names that are not plain folder names or that the catalog already has."""
        if not _SAFE_NAME.match(name):
            raise InputError(
                f"model name {name!r}: expected letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if name in self.names() or (self.user_dir / name).exists():
            raise FileExistsError(f"{self.user_dir / name}: a model named {name!r} already exists; choose another name")
        return name

    def next_version_name(self, base: str) -> str:
        """``base-vN`` with the smallest N >= 2 not yet used (``demo`` -> ``demo-v2``, ``demo-v2`` -> ``demo-v3``)."""
        match = _VERSION_SUFFIX.search(base)
        stem = base[: match.start()] if match else base
        number = int(match.group(1)) + 1 if match else 2
        taken = set(self.names())
        while f"{stem}-v{number}" in taken or (self.user_dir / f"{stem}-v{number}").exists():
            number += 1
        return f"{stem}-v{number}"

    def add(self, folder: str | os.PathLike, name: str | None = None) -> ModelEntry:
        """Register a bundle folder: one already in the user's folder is used in place, any other
        is copied there (atomically) under ``name`` (default: its folder name).

        Raises:
            BundleError: not a bundle. FileExistsError: the name is taken.
        """
        folder = Path(folder).expanduser().resolve()
        metadata = read_bundle_metadata(folder)
        if self._in_user_dir(folder) and (name is None or name == folder.name):
            return ModelEntry(folder.name, folder, USER, metadata)
        name = self.check_new_name(folder.name if name is None else name)
        target = self.user_dir / name
        with atomic_dir(target) as tmp:
            for item in (MODEL_JSON, WEIGHTS_FILE):
                shutil.copy2(folder / item, tmp / item)
        return ModelEntry(name, target, USER, read_bundle_metadata(target))
