"""Volume nodes to and from files, and their voxel geometry, with MRML's own readers and writers.

Nothing here adds a node to a scene: storage nodes are used stand-alone, so writing a
temporary file or reading a result leaves the user's scene untouched until the caller
decides to add something. Files are written atomically (temporary name, then rename).

MRML keeps every volume right-handed: a file whose axes are left-handed (det of the
direction matrix < 0) is read with its last axis reversed. The geometry is the same in
patient space; only the voxel order differs, so compare volumes with :func:`ijk_to_ras`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from repux.atomic import atomic_path
from repux.errors import InputError

#: Endings :func:`write_volume_node` writes (through ITK, as Slicer's "Save" does).
VOLUME_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


def ijk_to_ras(volume_node: "slicer.vtkMRMLVolumeNode") -> np.ndarray:
    """The node's 4x4 voxel-index (i, j, k) to RAS mm matrix (without parent transforms)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return vtk_matrix_to_array(matrix)


def vtk_matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def dimensions(volume_node: "slicer.vtkMRMLVolumeNode") -> tuple[int, int, int]:
    """Voxel counts along i, j, k."""
    image = volume_node.GetImageData()
    if image is None:
        raise InputError(f"volume {volume_node.GetName()!r}: has no voxel data")
    return tuple(int(d) for d in image.GetDimensions())  # type: ignore[return-value]


def same_grid(a: "slicer.vtkMRMLVolumeNode", b: "slicer.vtkMRMLVolumeNode", tol: float = 1e-3) -> bool:
    """True when both volumes have the same voxel counts and voxel-to-RAS matrix (mm within ``tol``)."""
    return dimensions(a) == dimensions(b) and np.allclose(ijk_to_ras(a), ijk_to_ras(b), atol=tol)


def voxel_array(volume_node: "slicer.vtkMRMLVolumeNode") -> np.ndarray:
    """A copy of the voxels of a scalar volume, shape (K, J, I) (VTK/Slicer order)."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume {volume_node.GetName()!r}: has no voxel data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"volume {volume_node.GetName()!r}: has {image.GetNumberOfScalarComponents()} components per voxel; "
            "expected a scalar volume"
        )
    shape = tuple(reversed(image.GetDimensions()))
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def image_data_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """A vtkImageData holding a copy of ``array`` (shape (K, J, I)); origin 0, spacing 1."""
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def labelmap_node_from_array(
    array: np.ndarray, ijk_to_ras_matrix: np.ndarray, name: str = "labels"
) -> "slicer.vtkMRMLLabelMapVolumeNode":
    """A labelmap node (not in any scene) with voxels ``array`` (K, J, I) on the given grid."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetName(name)
    node.SetIJKToRASMatrix(array_to_vtk_matrix(ijk_to_ras_matrix))
    node.SetAndObserveImageData(image_data_from_array(array))
    return node


def _check_ending(path: Path) -> None:
    if not str(path).lower().endswith(VOLUME_FILE_ENDINGS):
        raise InputError(f"{path}: unsupported file ending; expected one of {', '.join(VOLUME_FILE_ENDINGS)}")


def read_volume_node(path: str | os.PathLike, labelmap: bool = False) -> "slicer.vtkMRMLVolumeNode":
    """Read a volume file into a new node that belongs to no scene.

    Raises:
        InputError: the file is missing or MRML cannot read it as a scalar volume.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a volume file)")
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise InputError(f"{path}: cannot be read as a volume (expected NIfTI, NRRD or MetaImage)")
    return node


def write_volume_node(
    volume_node: "slicer.vtkMRMLVolumeNode", path: str | os.PathLike, overwrite: bool = False, compress: bool = True
) -> Path:
    """Write a volume node's voxels and geometry to ``path`` atomically.

    The node's own storage node and the scene are not touched. ``compress=False`` is faster
    for files that are read once and deleted (a job's input).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        InputError: unsupported ending, or the writer failed.
    """
    path = Path(path)
    _check_ending(path)
    if volume_node.GetImageData() is None:
        raise InputError(f"volume {volume_node.GetName()!r}: has no voxel data to write to {path}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(tmp))
        storage.SetUseCompression(compress)
        if not storage.WriteData(volume_node) or not tmp.is_file():
            raise InputError(f"{path}: could not be written (volume {volume_node.GetName()!r})")
    return path
