"""One table of models: published (registry), shipped with the package, installed in the models folder.

States: ``shipped`` (inside the package), ``installed`` (a bundle in the models folder),
``available`` (published, can be pulled), ``reference`` (published, listed for information
only), ``broken`` (a folder in the models folder whose model.json cannot be read). Torch-free.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from repux.bundle.labels import read_json_file
from repux.bundle.metadata import BundleMetadata
from repux.errors import InputError
from repux.hub.folders import WORK_SUFFIX
from repux.hub.registry import format_size, load_registry

SHIPPED, INSTALLED, AVAILABLE, REFERENCE, BROKEN = "shipped", "installed", "available", "reference", "broken"


def shipped_models_dir() -> Path | None:
    """``models`` inside the importable ``repux`` package (found without importing torch)."""
    spec = importlib.util.find_spec("repux")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def bundle_folders(folder: Path | None) -> list[Path]:
    """The model folders in ``folder``: not hidden (unfinished writes, downloads), not training work folders."""
    if folder is None or not folder.is_dir():
        return []
    return [
        child
        for child in sorted(folder.iterdir())
        if child.is_dir() and not child.name.startswith((".", "_")) and not child.name.endswith(WORK_SUFFIX)
    ]


def _bundle_row(path: Path, state: str) -> dict[str, Any]:
    row = {"name": path.name, "architecture": "?", "modality": "?", "state": state, "size": "", "source": str(path)}
    try:
        metadata = BundleMetadata.from_json(read_json_file(path / "model.json"), str(path / "model.json"))
    except InputError as error:
        return {**row, "state": BROKEN, "problem": str(error)}
    weights = path / "model.safetensors"
    size = weights.stat().st_size if weights.is_file() else None
    source = str(metadata.provenance.get("source", path))
    return {
        **row,
        "architecture": metadata.architecture,
        "modality": metadata.modality,
        "size": format_size(size),
        "source": source,
    }


def model_rows(folder: Path) -> list[dict[str, Any]]:
    """Rows (name, architecture, modality, state, size, source) of every model, shipped first."""
    rows = [_bundle_row(path, SHIPPED) for path in bundle_folders(shipped_models_dir())]
    taken = {row["name"] for row in rows}
    installed = {path.name: path for path in bundle_folders(folder) if path.name not in taken}
    for model in load_registry().models:
        if model.name in installed:
            row = _bundle_row(installed.pop(model.name), INSTALLED)
            rows.append({**row, "title": model.title})
        else:
            rows.append(
                {
                    "name": model.name,
                    "architecture": model.architecture,
                    "modality": model.modality,
                    "state": AVAILABLE if model.importable else REFERENCE,
                    "size": model.size_text,
                    "source": model.url,
                    "title": model.title,
                }
            )
    rows += [_bundle_row(path, INSTALLED) for path in installed.values()]
    return rows
