"""Label presets of the published models: names, colours and Slicer terminology of each output channel.

Codes and colours are those of 3D Slicer's own terminology lists (SNOMED CT, category
"Anatomical Structure"; Slicer's Modules/Loadable/Terminologies/Resources). The presets
differ in channel order and organs:

- ``flare``: 3D UX-Net's FLARE dataset file (1 spleen, 2 kidney, 3 liver, 4 pancreas);
- ``flare21``: the FLARE21 challenge's own order (1 liver, 2 kidney, 3 spleen, 4 pancreas);
- ``amos``: the 15 AMOS organs (1 spleen ... 15 prostate/uterus).

A FLARE checkpoint does not say which order it was trained with, hence two presets.
"""

from __future__ import annotations

from repux.bundle.errors import BundleError
from repux.bundle.labels import DICOM_MASTER_CONTEXT, GENERAL_ANATOMY_CONTEXT, Code, Label

ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
RIGHT = Code("SCT", "24028007", "Right")
LEFT = Code("SCT", "7771000", "Left")

BACKGROUND = Label(0, "background", (0, 0, 0))

# organ name -> (type code, modifier, recommended RGB, terminology context)
_ORGANS: dict[str, tuple[Code, Code | None, tuple[int, int, int], str]] = {
    "spleen": (Code("SCT", "78961009", "Spleen"), None, (157, 108, 162), GENERAL_ANATOMY_CONTEXT),
    "kidney": (Code("SCT", "64033007", "Kidney"), None, (185, 102, 83), GENERAL_ANATOMY_CONTEXT),
    "right kidney": (Code("SCT", "64033007", "Kidney"), RIGHT, (185, 102, 83), GENERAL_ANATOMY_CONTEXT),
    "left kidney": (Code("SCT", "64033007", "Kidney"), LEFT, (185, 102, 83), GENERAL_ANATOMY_CONTEXT),
    "liver": (Code("SCT", "10200004", "Liver"), None, (221, 130, 101), GENERAL_ANATOMY_CONTEXT),
    "pancreas": (Code("SCT", "15776009", "Pancreas"), None, (249, 180, 111), GENERAL_ANATOMY_CONTEXT),
    "gallbladder": (Code("SCT", "28231008", "Gallbladder"), None, (139, 150, 98), GENERAL_ANATOMY_CONTEXT),
    "esophagus": (Code("SCT", "32849002", "Esophagus"), None, (211, 171, 143), GENERAL_ANATOMY_CONTEXT),
    "stomach": (Code("SCT", "69695003", "Stomach"), None, (216, 132, 105), GENERAL_ANATOMY_CONTEXT),
    "aorta": (Code("SCT", "15825003", "Aorta"), None, (224, 97, 76), GENERAL_ANATOMY_CONTEXT),
    # The IVC is only in the DICOM master list, which gives no recommended colour. This
    # venous blue is our own choice, picked to stand apart from the aorta's red beside it.
    "inferior vena cava": (Code("SCT", "64131007", "Inferior vena cava"), None, (0, 151, 206), DICOM_MASTER_CONTEXT),
    "right adrenal gland": (Code("SCT", "23451007", "Adrenal gland"), RIGHT, (249, 186, 150), GENERAL_ANATOMY_CONTEXT),
    "left adrenal gland": (Code("SCT", "23451007", "Adrenal gland"), LEFT, (249, 186, 150), GENERAL_ANATOMY_CONTEXT),
    "duodenum": (Code("SCT", "38848004", "Duodenum"), None, (255, 253, 229), GENERAL_ANATOMY_CONTEXT),
    "urinary bladder": (Code("SCT", "89837001", "Bladder"), None, (222, 154, 132), GENERAL_ANATOMY_CONTEXT),
    # AMOS puts prostate and uterus in one channel, and Slicer's lists have no concept for
    # "prostate or uterus". We code it as Prostate (a single code a DICOM SEG export can
    # carry) but keep the name "prostate/uterus" so the merge stays visible; for a female
    # patient the Segment Editor's terminology selector changes the type to Uterus.
    "prostate/uterus": (Code("SCT", "41216001", "Prostate"), None, (230, 158, 140), GENERAL_ANATOMY_CONTEXT),
}

_PRESET_ORGANS: dict[str, tuple[str, ...]] = {
    "flare": ("spleen", "kidney", "liver", "pancreas"),
    "flare21": ("liver", "kidney", "spleen", "pancreas"),
    "amos": (
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "esophagus",
        "liver",
        "stomach",
        "aorta",
        "inferior vena cava",
        "pancreas",
        "right adrenal gland",
        "left adrenal gland",
        "duodenum",
        "urinary bladder",
        "prostate/uterus",
    ),
}

#: Preset names, for command-line choices.
LABEL_PRESETS = tuple(_PRESET_ORGANS)

#: Voxel spacing (mm, RAS x, y, z) the published models of each dataset were trained at.
PRESET_SPACING: dict[str, tuple[float, float, float]] = {
    "flare": (1.0, 1.0, 1.2),
    "flare21": (1.0, 1.0, 1.2),
    "amos": (1.5, 1.5, 2.0),
}


def organ_label(value: int, organ: str) -> Label:
    """The label of a known organ (a name in any preset) at ``value``."""
    type_, modifier, color, context = _ORGANS[organ]
    return Label(value, organ, color, ANATOMICAL_STRUCTURE, type_, modifier, context)


def label_preset(name: str) -> list[Label]:
    """Background plus the organs of preset ``name`` ("flare", "flare21" or "amos"), in channel order."""
    if name not in _PRESET_ORGANS:
        raise BundleError(f"unknown label preset {name!r} (expected one of {', '.join(LABEL_PRESETS)})")
    return [BACKGROUND] + [organ_label(i, organ) for i, organ in enumerate(_PRESET_ORGANS[name], start=1)]
