"""Reviewing a segmentation by the model's confidence, in the scene (GUI-free).

What the module's review panel shows, computed from MRML nodes with :mod:`repux.review`:

- :func:`import_confidence`: the confidence map of a ``repux segment --confidence`` job as a
  scalar volume node on the CT's grid (values 0..1) with the colour table
  :data:`CONFIDENCE_COLORS` (low = red, high = transparent), ready for an overlay and a legend;
- :func:`review_rows`: the per-segment review table (volume, pieces, mean confidence, ...);
- :class:`UncertainRegionTour`: the next low-confidence region to look at, largest first,
  never twice, with a RAS point to centre the slice views on and the organs it touches;
- :func:`roi_box`: a markups ROI node as the ``--roi`` box;
- :func:`merge_region_result`: a ``--roi --update`` result written into the segments, changing
  only voxels whose label the job changed (the user's edits outside the box are kept);
- :func:`ranked_cases`: the cases of a ``repux rank`` table, most uncertain first.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
import slicer
from repux.bundle.labels import Label
from repux.errors import InputError
from repux.infer.roi import RasBox
from repux.options import LOW_CONFIDENCE
from repux.review import CONNECTIVITY, REVIEW_SCALE, low_confidence_mask, organ_review, uncertain_regions

from . import segmentations
from .volumes import array_to_vtk_matrix, ijk_to_ras, image_data_from_array, read_volume_node, same_grid, voxel_array

#: Name of the colour table of confidence overlays (one per scene, shared).
CONFIDENCE_COLORS = "RepUX confidence"
#: Node attribute marking a confidence volume (value: the segmentation node's ID).
CONFIDENCE_ATTRIBUTE = "RepUXSegment.ConfidenceOf"
#: Node attribute of a volume loaded from a ranking: the file it came from (for ``seen``).
CASE_PATH_ATTRIBUTE = "RepUXSegment.CasePath"


def confidence_color_node(scene: "slicer.vtkMRMLScene") -> "slicer.vtkMRMLColorTableNode":
    """The scene's :data:`CONFIDENCE_COLORS` table, created on first use: 256 entries from
    opaque red (confidence 0) through yellow (0.5) to transparent green (1)."""
    existing = scene.GetFirstNodeByName(CONFIDENCE_COLORS)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(CONFIDENCE_COLORS)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for index in range(256):
        value = index / 255.0
        red, green = (1.0, 2 * value) if value < 0.5 else (2 * (1 - value), 1.0)
        # Confident voxels fade out so that the CT shows through where nothing needs a look.
        table.SetColor(index, f"{value:.2f}", red, green, 0.0, 1.0 - value)
    table.SetAttribute("Category", "RepUXSegment")
    scene.AddNode(table)
    return table


def import_confidence(
    scene: "slicer.vtkMRMLScene",
    path: str | os.PathLike,
    volume_node: "slicer.vtkMRMLScalarVolumeNode",
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    confidence_node: "slicer.vtkMRMLScalarVolumeNode | None" = None,
) -> "slicer.vtkMRMLScalarVolumeNode":
    """Load a job's confidence map (uint8, probability x 255) as float 0..1 on ``volume_node``'s grid.

    Into ``confidence_node`` when given (its voxels replaced), else a new node named after the
    segmentation, with a display node using :func:`confidence_color_node`, window 0..1.
    Checks everything before touching the scene.
    """
    result = read_volume_node(path)
    if not same_grid(result, volume_node):
        raise InputError(f"{path}: the confidence map is not on the grid of volume {volume_node.GetName()!r}")
    values = voxel_array(result).astype(np.float32) / REVIEW_SCALE
    node = confidence_node
    if node is None:
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetName(scene.GenerateUniqueName(f"{segmentation_node.GetName()} confidence"))
        scene.AddNode(node)
    node.SetIJKToRASMatrix(array_to_vtk_matrix(ijk_to_ras(volume_node)))
    node.SetAndObserveImageData(image_data_from_array(values))
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetAttribute(CONFIDENCE_ATTRIBUTE, segmentation_node.GetID() or "")
    display = node.GetDisplayNode()
    if display is None:
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        scene.AddNode(display)
        node.SetAndObserveDisplayNodeID(display.GetID())
    display.SetAndObserveColorNodeID(confidence_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    return node


def _check_pair(segmentation_node, confidence_node, labels: Sequence[Label]):
    """The segments as a label map (K, J, I) on the confidence node's grid, and the confidence."""
    geometry = segmentations.reference_geometry(segmentation_node, confidence_node)
    # The user's own segments (a tumour, a note) are not the model's: left out of the review.
    label_array = segmentations.labelmap_array(segmentation_node, labels, geometry, ignore_unknown=True)
    confidence = voxel_array(confidence_node)
    if confidence.shape != label_array.shape:
        raise InputError(f"confidence {confidence_node.GetName()!r}: grid {confidence.shape} differs from the segmentation's")
    return label_array, confidence


def _spacing_kji(node) -> tuple[float, float, float]:
    spacing = node.GetSpacing()
    return (spacing[2], spacing[1], spacing[0])


def review_rows(
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    confidence_node: "slicer.vtkMRMLScalarVolumeNode",
    labels: Sequence[Label],
    threshold: float = LOW_CONFIDENCE,
) -> list[dict[str, Any]]:
    """One row per label of ``labels`` (as ``repux segment --review``) plus ``segment_id``:
    the segment to select when the row is clicked (None for a label without a segment).

    Computed from the segments as they are now (the user's edits included) and the
    confidence node (values 0..1).
    """
    label_array, confidence = _check_pair(segmentation_node, confidence_node, labels)
    rows = organ_review(label_array, confidence, _spacing_kji(confidence_node), labels, threshold)
    segmentation = segmentation_node.GetSegmentation()
    by_name = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
               for i in range(segmentation.GetNumberOfSegments())}
    for row in rows:
        row.pop("case", None)
        row["segment_id"] = by_name.get(row["name"])
    return rows


def ras_of(node, index_kji: Sequence[int]) -> tuple[float, float, float]:
    """RAS mm (without parent transforms) of voxel (k, j, i) of ``node``."""
    k, j, i = index_kji
    point = ijk_to_ras(node) @ np.array([i, j, k, 1.0])
    return (float(point[0]), float(point[1]), float(point[2]))


class UncertainRegionTour:
    """The low-confidence regions of a result, visited largest first, each once.

    Args:
        segmentation_node, confidence_node, labels: the result to review and the model's labels.
        threshold: confidence below which a voxel is low-confidence.
        min_voxels: smaller regions are not visited (single noisy voxels).
        visited: :attr:`visited` of an earlier tour (e.g. before the confidence was updated by
            a re-segmentation): regions holding a point visited then are not visited again.

    :meth:`next_region` returns a dict: ``ras`` (the point to centre the views on, a voxel of
    the region), ``voxels``, ``volume_ml``, ``organs`` (names of the labels the region
    holds, most voxels first; "background" for label 0), ``number`` (1, 2, ...), ``left``
    (regions not yet visited); None when every region was visited.
    """

    def __init__(
        self,
        segmentation_node: "slicer.vtkMRMLSegmentationNode",
        confidence_node: "slicer.vtkMRMLScalarVolumeNode",
        labels: Sequence[Label],
        threshold: float = LOW_CONFIDENCE,
        min_voxels: int = 1,
        visited: Collection[tuple[int, int, int]] = (),
    ) -> None:
        label_array, confidence = _check_pair(segmentation_node, confidence_node, labels)
        regions = uncertain_regions(confidence, label_array, _spacing_kji(confidence_node), threshold, min_voxels)
        self.visited: set[tuple[int, int, int]] = set(visited)
        if self.visited:
            # Which region each visited point lies in: the same 26-connected labelling.
            numbers, _ = ndimage.label(low_confidence_mask(confidence, threshold), structure=CONNECTIVITY)
            seen = {int(numbers[point]) for point in self.visited} - {0}
            regions = [r for r in regions if int(numbers[r.centre]) not in seen]
        self._regions = regions
        self._names = {label.value: label.name for label in labels}
        self._node = confidence_node
        self._done = 0

    def __len__(self) -> int:
        return len(self._regions)

    def next_region(self) -> dict[str, Any] | None:
        """The largest region not visited yet (see the class), or None."""
        for region in self._regions[self._done:]:
            self._done += 1
            self.visited.add(region.centre)
            return {
                "ras": ras_of(self._node, region.centre),
                "voxels": region.voxels,
                "volume_ml": region.volume_ml,
                "organs": [self._names.get(value, f"label {value}") for value in region.labels],
                "number": self._done,
                "left": len(self._regions) - self._done,
            }
        return None



def roi_box(roi_node: "slicer.vtkMRMLMarkupsROINode", volume_node=None) -> RasBox:
    """The box of a markups ROI node in RAS mm (a rotated ROI: its axis-aligned bounding box).

    Raises:
        InputError: the ROI has zero size, or the ROI or the volume is under a transform
            (the box must be in the volume's own RAS coordinates).
    """
    for node in (roi_node, volume_node):
        if node is not None and node.GetParentTransformNode() is not None:
            raise InputError(f"{node.GetName()!r}: is under a transform; harden the transform first")
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    return RasBox.from_corners(bounds[0::2], bounds[1::2], f"ROI {roi_node.GetName()!r}")


def roi_argument(box: RasBox) -> str:
    """``--roi=R0,A0,S0,R1,A1,S1`` for a box (the ``=`` keeps a negative first number a value)."""
    return "--roi=" + ",".join(f"{v:.6f}" for v in (*box.low, *box.high))


def merge_region_result(
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    result: np.ndarray,
    before: np.ndarray,
    geometry_matrix: np.ndarray,
    labels: Sequence[Label],
) -> int:
    """Write a ``--roi --update`` result into the model's segments; return the voxels changed.

    ``result`` and ``before`` (K, J, I) are label maps on ``geometry_matrix``: the job's output
    and the map it was given as ``--update``. Only voxels where they differ change, each in
    the segment it leaves and the segment it joins; every other voxel of every segment (the
    user's edits, overlaps, segments the model does not know) stays as it is.
    """
    changed = result != before
    count = int(np.count_nonzero(changed))
    if count == 0:
        return 0
    values = segmentations.values_by_segment(segmentation_node, labels, ignore_unknown=True)
    reference = segmentations.oriented_image(np.zeros(result.shape, np.uint8), geometry_matrix)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    was_modifying = segmentation_node.StartModify()
    try:
        for segment_id, value in values.items():
            touched = changed & ((before == value) | (result == value))
            if not touched.any():
                continue
            current = segmentations.segment_mask(segmentation_node, segment_id, reference)
            updated = np.where(touched, result == value, current).astype(np.uint8)
            image = segmentations.oriented_image(updated, geometry_matrix)
            if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
                raise InputError(f"segment {segment_id!r}: could not be updated")
    finally:
        segmentation_node.EndModify(was_modifying)
    return count


def merge_region_confidence(confidence_node: "slicer.vtkMRMLScalarVolumeNode", region_bytes: np.ndarray) -> None:
    """Replace the confidence inside a re-segmented box: ``region_bytes`` (K, J, I, uint8) is
    the ``--roi`` job's map, 0 outside the box and at least 255 / C inside it."""
    values = voxel_array(confidence_node)
    if values.shape != region_bytes.shape:
        raise InputError(f"confidence {confidence_node.GetName()!r}: grid {values.shape} differs from the region's {region_bytes.shape}")
    inside = region_bytes > 0
    values[inside] = region_bytes[inside].astype(np.float32) / REVIEW_SCALE
    confidence_node.SetAndObserveImageData(image_data_from_array(values.astype(np.float32)))


def ranked_cases(ranking_path: str | os.PathLike) -> list[Path]:
    """The case paths of a ``repux rank`` table (.csv or .json), in rank order."""
    path = Path(ranking_path)
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            with open(path, newline="", encoding="utf-8") as stream:
                rows = list(csv.DictReader(stream))
        ordered = sorted(rows, key=lambda row: int(row["rank"]))
        return [Path(row["path"]) for row in ordered]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a ranking table of repux rank ({error}); expected rank and path columns") from None


def next_ranked_case(ranking_path: str | os.PathLike, seen: Collection[str | os.PathLike]) -> Path | None:
    """The first case of the ranking whose path is not in ``seen`` (paths compared resolved), or None."""
    done = {Path(p).resolve() for p in seen}
    return next((case for case in ranked_cases(ranking_path) if case.resolve() not in done), None)
