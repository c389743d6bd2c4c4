"""Is this scan like the ones the model was trained on? Warnings, not refusals.

A network gives confident labels for anything; a head CT run through an abdominal model
gets a "liver". The checks here are cheap (no torch) and look at what a bundle records:

- intensities against the modality: a CT in HU has air at about -1000 around the body;
  a scan with no voxel below :data:`AIR_CEILING_HU` is not a whole-body CT in HU (a
  cropped or windowed scan, or one whose rescale was not applied);
- field of view against ``provenance.training_extent_mm``: the scan's extent along some
  RAS axis below :data:`SMALLER_SHARE` of the smallest training extent, or above
  :data:`LARGER_FACTOR` times the largest (a head CT is about 220 mm wide, an abdominal
  CT 350 mm or more; a scan from chest to pelvis may be twice as long as an abdominal one).
"""

from __future__ import annotations

import numpy as np

from repux.bundle.metadata import BundleMetadata
from repux.imageio import Volume

#: A CT in HU with any air in it has voxels below this (air is about -1000, lung about -800).
AIR_CEILING_HU = -500.0
#: A field of view below this share of the smallest training extent gets a warning...
SMALLER_SHARE = 0.75
#: ... and one above this multiple of the largest.
LARGER_FACTOR = 1.5


def field_of_view_mm(volume: Volume) -> np.ndarray:
    """Extent (3,) in mm of the volume's voxels (their whole cells) along RAS x, y, z."""
    corners = np.array(
        [[i, j, k, 1.0] for i in (-0.5, volume.shape[0] - 0.5) for j in (-0.5, volume.shape[1] - 0.5)
         for k in (-0.5, volume.shape[2] - 0.5)]
    )  # fmt: skip
    points = corners @ volume.affine.T
    return points[:, :3].max(axis=0) - points[:, :3].min(axis=0)


def scan_warnings(volume: Volume, metadata: BundleMetadata, source: str = "image") -> list[str]:
    """Why ``volume`` (HU) does not look like the scans ``metadata``'s model was trained on."""
    warnings = []
    if metadata.modality == "CT":
        low = float(np.min(volume.array))
        if low >= 0:
            warnings.append(
                f"{source}: no negative voxel values (minimum {low:g}); a CT in HU has air at about -1000: "
                "check that the image is a CT with its rescale applied; expect wrong labels"
            )
        elif low > AIR_CEILING_HU:
            warnings.append(
                f"{source}: no air in the scan (lowest value {low:g} HU; a CT of the body in HU has air at about "
                f"-1000 around it): not the kind of scan model {metadata.name!r} was trained on; expect wrong labels"
            )
    extent = metadata.training_extent_mm
    if extent is not None:
        fov = field_of_view_mm(volume)
        low_mm, high_mm = np.asarray(extent[0]), np.asarray(extent[1])
        outside = (fov < low_mm * SMALLER_SHARE) | (fov > high_mm * LARGER_FACTOR)
        if outside.any():
            shown = " x ".join(f"{v:.0f}" for v in fov)
            trained = " x ".join(f"{a:.0f}-{b:.0f}" for a, b in zip(low_mm, high_mm))
            warnings.append(
                f"{source}: field of view {shown} mm (RAS x y z) is far from the {trained} mm of the scans model "
                f"{metadata.name!r} was trained on; expect wrong labels"
            )
    return warnings
