"""``model.json``: everything needed to run a bundle's weights besides the weights themselves.

Format version 1, an object with exactly these keys::

    format_version  1
    name            short model name (string)
    description     free text (string, may be empty)
    architecture    "repuxnet" or "uxnet" (repux.network.ARCHITECTURES)
    network         the network's constructor arguments (its ``.config`` without "arch")
    modality        "CT"
    preprocessing   {"spacing": [x, y, z] mm in RAS order, "orientation": "RAS",
                     "intensity": {"a_min", "a_max": HU window, "b_min", "b_max": its
                     output range, "clip": true/false}, "patch_size": [3 ints, multiples of 16]}
    inference       {"overlap": 0 <= o < 1, "sw_batch_size": windows per forward pass,
                     "blend": "constant" or "gaussian"}
    labels          label list (repux.bundle.labels), values exactly 0..out_chans-1
    provenance      free-form object; the documented keys are checked when present:
                     source (text: where the weights came from), source_file, source_sha256
                     (64 hex digits), training_data, optimizer (text or object), iterations
                     (int), validation_dice ({label name or "mean": 0..1, or null where a label
                     never occurs in the validation cases}), command, seed
                     (int), created (ISO 8601 time), repux_version, synthetic_only (true:
                     trained on synthetic phantoms only, a demo that is not for real scans),
                     training_extent_mm ({"min": [x, y, z], "max": [x, y, z]}: the range of
                     the training images' field of view in mm along RAS x, y, z).

This module reads and checks JSON only; weights are checked against the architecture by
:mod:`repux.bundle.store`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from repux.bundle.errors import BundleError, JsonFields, is_int, is_number
from repux.bundle.labels import Label, check_label_values, labels_from_list, labels_to_json

#: The ``format_version`` this code writes, and the newest it reads.
FORMAT_VERSION = 1
MODALITIES = ("CT",)
BLEND_MODES = ("constant", "gaussian")
#: Every network input side must be a multiple of this (the encoder halves four times).
PATCH_MULTIPLE = 16

_TOP_KEYS = (
    "format_version",
    "name",
    "description",
    "architecture",
    "network",
    "modality",
    "preprocessing",
    "inference",
    "labels",
    "provenance",
)
_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def default_preprocessing(
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.2), patch_size: tuple[int, int, int] = (96, 96, 96)
) -> dict[str, Any]:
    """The published CT recipe: RAS, ``spacing`` mm, -125..275 HU scaled to 0..1 with clipping."""
    return {
        "spacing": [float(s) for s in spacing],
        "orientation": "RAS",
        "intensity": {"a_min": -125.0, "a_max": 275.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
        "patch_size": [int(p) for p in patch_size],
    }


def default_inference() -> dict[str, Any]:
    """The published inference settings: overlap 0.5, 4 windows per pass, constant blending."""
    return {"overlap": 0.5, "sw_batch_size": 4, "blend": "constant"}


@dataclass
class BundleMetadata:
    """The content of ``model.json`` (see the module docstring for every key and unit).

    ``network`` holds constructor arguments (no "arch"); ``preprocessing``, ``inference`` and
    ``provenance`` are plain dicts in their JSON form. ``from_json`` checks and normalises
    everything; ``save_bundle`` checks a hand-made instance the same way before writing.
    """

    name: str
    architecture: str
    network: dict[str, Any]
    labels: list[Label]
    description: str = ""
    modality: str = "CT"
    preprocessing: dict[str, Any] = field(default_factory=default_preprocessing)
    inference: dict[str, Any] = field(default_factory=default_inference)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def out_chans(self) -> int:
        return int(self.network["out_chans"])

    @property
    def synthetic_only(self) -> bool:
        """True when the provenance says the model saw synthetic phantoms only (the demo)."""
        return self.provenance.get("synthetic_only") is True

    @property
    def usage_warning(self) -> str | None:
        """What to tell a user wherever the model is chosen, or None when there is nothing to say."""
        if not self.synthetic_only:
            return None
        return (
            f"model {self.name!r} was trained on synthetic phantoms only: it is a demo, not for real scans "
            "(its labels on a patient's CT mean nothing)"
        )

    @property
    def training_extent_mm(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(min, max) field of view of the training images in mm along RAS x, y, z, where recorded."""
        extent = self.provenance.get("training_extent_mm")
        if extent is None:
            return None
        return tuple(float(v) for v in extent["min"]), tuple(float(v) for v in extent["max"])

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "description": self.description,
            "architecture": self.architecture,
            "network": dict(self.network),
            "modality": self.modality,
            "preprocessing": self.preprocessing,
            "inference": self.inference,
            "labels": labels_to_json(self.labels),
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "model.json") -> "BundleMetadata":
        """Check ``data`` (parsed ``model.json``) and build the metadata; errors name ``source``."""
        top = JsonFields(data, source)
        # The version first: a newer file may legitimately have keys this version does not know.
        version = top.integer("format_version", minimum=1)
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{source}: key 'format_version': expected {FORMAT_VERSION} or lower, got {version}; "
                "the bundle was written by a newer repux: upgrade repux to read it"
            )
        top.only(_TOP_KEYS)
        architecture = top.string("architecture")
        network = _network(top.obj("network"), architecture)
        labels = labels_from_list(top.array("labels"), source)
        check_label_values(labels, source, "labels", out_chans=network["out_chans"])
        return cls(
            name=top.string("name"),
            architecture=architecture,
            network=network,
            labels=labels,
            description=top.text("description"),
            modality=top.get("modality", f"one of {', '.join(MODALITIES)}", lambda v: v in MODALITIES),
            preprocessing=_preprocessing(top.obj("preprocessing")),
            inference=_inference(top.obj("inference")),
            provenance=_provenance(top.obj("provenance"), labels),
            format_version=version,
        )


def _network(fields: JsonFields, architecture: str) -> dict[str, Any]:
    # The constructor checks the rest (store.py builds it); here what other keys depend on.
    network = dict(fields.data)
    if "arch" in network:
        fields.get("arch", f"{architecture!r} (the top-level 'architecture')", lambda v: v == architecture)
        del network["arch"]
    fields.integer("out_chans", minimum=2)
    fields.get("in_chans", "1 (one CT channel)", lambda v: is_int(v) and v == 1)
    return network


def _three(check: Any) -> Any:
    return lambda v: isinstance(v, list) and len(v) == 3 and all(check(x) for x in v)


def _preprocessing(fields: JsonFields) -> dict[str, Any]:
    fields.only(("spacing", "orientation", "intensity", "patch_size"))
    spacing = fields.get("spacing", "3 positive numbers (mm, RAS x y z)", _three(lambda x: is_number(x) and x > 0))
    orientation = fields.get(
        "orientation",
        "3 axis letters, one of each L/R, A/P, S/I (e.g. 'RAS')",
        lambda v: isinstance(v, str) and len(v) == 3 and all(len(pair & set(v)) == 1 for pair in _AXIS_PAIRS),
    )
    intensity = fields.obj("intensity")
    intensity.only(("a_min", "a_max", "b_min", "b_max", "clip"))
    window = {key: intensity.number(key) for key in ("a_min", "a_max", "b_min", "b_max")}
    if not window["a_min"] < window["a_max"]:
        raise intensity.error("a_max", f"a number greater than a_min ({window['a_min']})", window["a_max"])
    window["clip"] = intensity.boolean("clip")
    patch_size = fields.get(
        "patch_size",
        f"3 positive integers, multiples of {PATCH_MULTIPLE}",
        _three(lambda x: is_int(x) and x > 0 and x % PATCH_MULTIPLE == 0),
    )
    return {
        "spacing": [float(s) for s in spacing],
        "orientation": orientation,
        "intensity": window,
        "patch_size": list(patch_size),
    }


def _inference(fields: JsonFields) -> dict[str, Any]:
    fields.only(("overlap", "sw_batch_size", "blend"))
    return {
        "overlap": float(fields.get("overlap", "a number 0 <= overlap < 1", lambda v: is_number(v) and 0 <= v < 1)),
        "sw_batch_size": fields.integer("sw_batch_size", minimum=1),
        "blend": fields.get("blend", f"one of {', '.join(BLEND_MODES)}", lambda v: v in BLEND_MODES),
    }


def _provenance(fields: JsonFields, labels: list[Label]) -> dict[str, Any]:
    is_text = lambda v: isinstance(v, str)  # noqa: E731
    checks: dict[str, tuple[str, Any]] = {
        "source": ("a string", is_text),
        "source_file": ("a string", is_text),
        "source_sha256": ("64 hexadecimal digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)),
        "training_data": ("a string", is_text),
        "optimizer": ("a string or an object", lambda v: isinstance(v, (str, dict))),
        "iterations": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
        "command": ("a string", is_text),
        "seed": ("an integer", is_int),
        "created": ("a string (ISO 8601 time)", is_text),
        "repux_version": ("a string", is_text),
        "synthetic_only": ("true or false", lambda v: isinstance(v, bool)),
    }
    for key, (expected, check) in checks.items():
        if key in fields:
            fields.get(key, expected, check)
    if "validation_dice" in fields:
        dice = fields.obj("validation_dice")
        names = {label.name for label in labels} | {"mean"}
        for name in dice.data:
            if name not in names:
                raise BundleError(f"{fields.source}: unknown key '{dice.key(name)}' (expected label names or 'mean')")
            dice.get(name, "a Dice score 0..1, or null", lambda v: v is None or (is_number(v) and 0 <= v <= 1))
    if "training_extent_mm" in fields:
        extent = fields.obj("training_extent_mm")
        extent.only(("min", "max"))
        positive = _three(lambda x: is_number(x) and x > 0)
        low = extent.get("min", "3 positive numbers (mm, RAS x y z)", positive)
        extent.get(
            "max",
            "3 numbers (mm, RAS x y z), each at least its 'min'",
            lambda v: positive(v) and all(a <= b for a, b in zip(low, v)),
        )
    return dict(fields.data)
