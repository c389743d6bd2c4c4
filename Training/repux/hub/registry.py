"""The registry of published models: ``registry.json`` in this package, checked when read.

One JSON object ``{"format_version": 1, "models": [...]}``; each model has:

    name            catalog name (letters, digits, '.', '_', '-'); its bundle folder's name
    title           one line for people
    architecture    "repuxnet" or "uxnet"; network: its constructor arguments
    labels          a label preset (repux.bundle.presets) or null where none fits
    label_note      what is known about the label order (and what is not)
    modality        "CT" or "MR"
    preprocessing   spacing (3 mm, RAS; null = no resampling), orientation, intensity
                    (a_min, a_max, b_min, b_max, clip), patch_size (3 ints), overlap
    source          url (as the authors publish it), kind ("google-drive-file",
                    "google-drive-folder" or "http"), page (paper or code page)
    size_bytes      int or null (unknown);  sha256: 64 hex digits or null (unknown)
    reported_dice   the authors' mean Dice, or null
    license         SPDX id or null;  license_note: text
    citation        text
    importable      false for a model listed for reference only; then not_importable_reason

``$REPUX_REGISTRY`` names another file in the same format that replaces this one (an
internal mirror of the checkpoints, or the tests' loopback server). Torch-free.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repux.bundle.errors import BundleError, JsonFields, is_int, is_number
from repux.bundle.labels import read_json_file
from repux.bundle.presets import LABEL_PRESETS, label_preset
from repux.errors import InputError

REGISTRY_ENV = "REPUX_REGISTRY"
SHIPPED_REGISTRY = Path(__file__).resolve().parent / "registry.json"
REGISTRY_FORMAT_VERSION = 1
SOURCE_KINDS = ("google-drive-file", "google-drive-folder", "http")
MODALITIES = ("CT", "MR")
ARCHITECTURES = ("repuxnet", "uxnet")  # repux.network.ARCHITECTURES, without importing torch

_MODEL_KEYS = (
    "name",
    "title",
    "architecture",
    "network",
    "labels",
    "label_note",
    "modality",
    "preprocessing",
    "source",
    "size_bytes",
    "sha256",
    "reported_dice",
    "license",
    "license_note",
    "citation",
    "importable",
    "not_importable_reason",
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PublishedModel:
    """One registry entry (see the module docstring for each field)."""

    name: str
    title: str
    architecture: str
    network: dict[str, Any]
    labels: str | None
    label_note: str
    modality: str
    preprocessing: dict[str, Any]
    url: str
    source_kind: str
    page: str
    size_bytes: int | None
    sha256: str | None
    reported_dice: float | None
    license: str | None
    license_note: str
    citation: str
    importable: bool
    not_importable_reason: str = ""

    @property
    def weights_network(self) -> dict[str, Any]:
        """The constructor arguments the weights determine: all but the prior's ``a`` (not stored)."""
        return {key: value for key, value in self.network.items() if key != "a"}

    @property
    def size_text(self) -> str:
        """The download size for people ("1.2 GB", or "size unknown")."""
        return format_size(self.size_bytes)

    def card_text(self) -> str:
        """A few lines for people: what it is, size, source, labels, licence, citation."""
        lines = [f"{self.name}: {self.title}", f"Download: {self.size_text} from {self.url}"]
        lines.append(f"Network: {self.architecture}, {self.modality}; reported mean Dice {self.reported_dice}")
        if self.label_note:
            lines.append(f"Labels: {self.label_note}")
        lines.append(f"Licence: {self.license or 'not stated'}. {self.license_note}".rstrip())
        lines.append(f"Cite: {self.citation}")
        return "\n".join(lines)

    def card(self) -> dict[str, Any]:
        """The entry as a JSON-ready dict (for ``repux models list --json`` and Slicer)."""
        return {
            "name": self.name,
            "title": self.title,
            "architecture": self.architecture,
            "network": self.network,
            "labels": self.labels,
            "label_note": self.label_note,
            "modality": self.modality,
            "preprocessing": self.preprocessing,
            "url": self.url,
            "source_kind": self.source_kind,
            "page": self.page,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "reported_dice": self.reported_dice,
            "license": self.license,
            "license_note": self.license_note,
            "citation": self.citation,
            "importable": self.importable,
            "not_importable_reason": self.not_importable_reason,
        }


def format_size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


class Registry:
    """The published models of one registry file, by name."""

    def __init__(self, models: list[PublishedModel], path: Path) -> None:
        self.models = models
        self.path = path

    def names(self) -> list[str]:
        return [model.name for model in self.models]

    def get(self, name: str) -> PublishedModel:
        """The entry called ``name``.

        Raises:
            InputError: no such entry (the message lists the registry's names).
        """
        for model in self.models:
            if model.name == name:
                return model
        raise InputError(f"model {name!r}: not in the registry {self.path}; expected one of {', '.join(self.names())}")


def registry_path() -> Path:
    """``$REPUX_REGISTRY`` when set, else the registry shipped in the package."""
    override = os.environ.get(REGISTRY_ENV)
    return Path(override).expanduser() if override else SHIPPED_REGISTRY


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Read and check a registry file (default: :func:`registry_path`).

    Raises:
        BundleError: malformed JSON, missing or mistyped keys, unknown presets, duplicate
            names; the message names the file, the key and what was expected.
    """
    path = Path(path) if path is not None else registry_path()
    top = JsonFields(read_json_file(path), str(path))
    top.only(("format_version", "models"))
    version = top.integer("format_version", minimum=1)
    if version > REGISTRY_FORMAT_VERSION:
        raise BundleError(f"{path}: key 'format_version': expected {REGISTRY_FORMAT_VERSION} or lower, got {version}")
    models = []
    for index, item in enumerate(top.array("models")):
        model = _model(JsonFields(item, str(path), f"models[{index}]"))
        if model.name in (m.name for m in models):
            raise BundleError(
                f"{path}: key 'models[{index}].name': {model.name!r} appears twice (expected unique names)"
            )
        models.append(model)
    return Registry(models, path)


def _optional(fields: JsonFields, name: str, expected: str, check) -> Any:
    return fields.get(name, f"{expected} or null", lambda v: v is None or check(v))


def _model(fields: JsonFields) -> PublishedModel:
    fields.only(_MODEL_KEYS)
    name = fields.get(
        "name",
        "a folder name (letters, digits, '.', '_', '-')",
        lambda v: isinstance(v, str) and bool(_SAFE_NAME.match(v)),
    )
    architecture = fields.get("architecture", f"one of {', '.join(ARCHITECTURES)}", lambda v: v in ARCHITECTURES)
    network = fields.obj("network")
    out_chans = network.integer("out_chans", minimum=2)
    network.get("in_chans", "1", lambda v: v == 1)
    labels = _optional(fields, "labels", f"a label preset ({', '.join(LABEL_PRESETS)})", lambda v: v in LABEL_PRESETS)
    if labels is not None and len(label_preset(labels)) != out_chans:
        raise fields.error("labels", f"a preset with {out_chans} labels (network.out_chans)", labels)
    modality = fields.get("modality", f"one of {', '.join(MODALITIES)}", lambda v: v in MODALITIES)
    source = fields.obj("source")
    source.only(("url", "kind", "page"))
    url = source.get("url", "an http(s) URL", lambda v: isinstance(v, str) and v.startswith(("https://", "http://")))
    kind = source.get("kind", f"one of {', '.join(SOURCE_KINDS)}", lambda v: v in SOURCE_KINDS)
    importable = fields.boolean("importable")
    if importable and (labels is None or modality != "CT"):
        raise fields.error("importable", "false for a model without a label preset or not CT", importable)
    if not importable:
        fields.string("not_importable_reason")
    return PublishedModel(
        name=name,
        title=fields.string("title"),
        architecture=architecture,
        network=dict(network.data),
        labels=labels,
        label_note=fields.text("label_note"),
        modality=modality,
        preprocessing=_preprocessing(fields.obj("preprocessing")),
        url=url,
        source_kind=kind,
        page=source.string("page"),
        size_bytes=_optional(fields, "size_bytes", "a positive integer (bytes)", lambda v: is_int(v) and v > 0),
        sha256=_optional(
            fields,
            "sha256",
            "64 lower-case hexadecimal digits",
            lambda v: isinstance(v, str) and bool(_SHA256.match(v)),
        ),
        reported_dice=_optional(fields, "reported_dice", "a number 0..1", lambda v: is_number(v) and 0 <= v <= 1),
        license=_optional(fields, "license", "an SPDX licence id", lambda v: isinstance(v, str) and v != ""),
        license_note=fields.text("license_note"),
        citation=fields.string("citation"),
        importable=importable,
        not_importable_reason=fields.data.get("not_importable_reason", ""),
    )


def _preprocessing(fields: JsonFields) -> dict[str, Any]:
    fields.only(("spacing", "orientation", "intensity", "patch_size", "overlap"))
    three_positive = lambda v: isinstance(v, list) and len(v) == 3 and all(is_number(x) and x > 0 for x in v)  # noqa: E731
    spacing = _optional(fields, "spacing", "3 positive numbers (mm, RAS x y z)", three_positive)
    intensity = fields.obj("intensity")
    intensity.only(("a_min", "a_max", "b_min", "b_max", "clip"))
    window = {key: intensity.number(key) for key in ("a_min", "a_max", "b_min", "b_max")}
    window["clip"] = intensity.boolean("clip")
    patch = fields.get(
        "patch_size",
        "3 positive multiples of 16",
        lambda v: isinstance(v, list) and len(v) == 3 and all(is_int(x) and x > 0 and x % 16 == 0 for x in v),
    )
    return {
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "orientation": fields.string("orientation"),
        "intensity": window,
        "patch_size": list(patch),
        "overlap": float(fields.get("overlap", "a number 0 <= overlap < 1", lambda v: is_number(v) and 0 <= v < 1)),
    }
