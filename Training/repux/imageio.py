"""Reading and writing 3-D medical volumes with their exact geometry.

One representation for every format the project meets (NIfTI, NRRD, MetaImage, a DICOM
series folder): :class:`Volume`, a numpy array indexed ``[i, j, k]`` (the file's own voxel
order, fastest axis first) plus the geometry that maps voxel indices to patient space.
SimpleITK does the file work, so LPS/RAS conventions and NIfTI qform/sform handling are
ITK's, the same as 3D Slicer's.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from repux.atomic import atomic_path
from repux.errors import InputError

#: File name endings this module reads and writes, longest first so ``.nii.gz`` wins over ``.gz``.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(InputError):
    """A volume file that cannot be used; the message names the file and what was expected."""


@dataclass
class Volume:
    """A 3-D scalar volume and its geometry.

    Attributes:
        array: voxel values, shape (I, J, K), indexed ``[i, j, k]``.
        spacing: voxel size along i, j, k in mm.
        origin: position of voxel (0, 0, 0) in LPS mm (ITK's convention).
        direction: 3x3 matrix whose columns are the unit directions of i, j, k in LPS.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix taking voxel indices (i, j, k, 1) to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(self.direction, dtype=float) @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix taking voxel indices (i, j, k, 1) to RAS mm (NIfTI's and MONAI's convention)."""
        return _LPS_TO_RAS @ self.affine_lps

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry holding other voxel values (same shape required)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {tuple(array.shape)} does not match the volume shape {self.shape}")
        return Volume(array, self.spacing, self.origin, np.array(self.direction, dtype=float))

    def same_geometry(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when shape, spacing, origin and direction agree (mm and cosines within ``tol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    @classmethod
    def from_affine(cls, array: np.ndarray, affine_ras: np.ndarray) -> "Volume":
        """Build a volume from a RAS voxel-to-mm affine (as MONAI and nibabel carry it)."""
        lps = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=float)
        linear = lps[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise ValueError(f"affine has a zero-length axis: {affine_ras.tolist()}")
        return cls(array, tuple(float(s) for s in spacing), tuple(float(o) for o in lps[:3, 3]), linear / spacing)


def volume_suffix(path: str | os.PathLike) -> str:
    """The recognised file ending of ``path`` (lower case), or '' when there is none."""
    name = str(path).lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _from_sitk(image: sitk.Image, source: str) -> Volume:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume"
        )
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise VolumeError(f"{source}: is {image.GetDimension()}-D with size {image.GetSize()}; expected a 3-D volume")
    if min(image.GetSize()) < 2:
        raise VolumeError(f"{source}: size {image.GetSize()} is a single slice thick; expected a 3-D volume")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return Volume(array, tuple(image.GetSpacing()), tuple(image.GetOrigin()), direction)


def _nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI-1 file is shorter than its header says, or None when it is complete.

    ITK reads a truncated NIfTI without complaint (missing voxels come back as zeros), so
    the data length is checked here against the header: vox_offset + voxels * bitpix / 8.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(348)
            if len(header) < 348:
                return f"header is {len(header)} bytes; a NIfTI-1 header has 348"
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            if struct.unpack(endian + "i", header[:4])[0] != 348:
                return None  # not NIfTI-1 (e.g. NIfTI-2): leave the verdict to ITK
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            voxels = 1
            for size in dims[1 : 1 + max(0, min(dims[0], 7))]:
                voxels *= max(int(size), 1)
            expected = vox_offset + voxels * bitpix // 8
            length = 348
            while chunk := stream.read(1 << 22):
                length += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        return f"compressed data is cut short ({error})"
    if length < expected:
        return f"holds {length} bytes; its header describes {expected}"
    return None


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file, or a folder holding one DICOM series.

    Raises:
        VolumeError: the path is missing, unreadable, truncated, not 3-D or not scalar.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise VolumeError(f"{path}: folder holds no DICOM series; expected one CT series")
            if len(series) > 1:
                raise VolumeError(f"{path}: folder holds {len(series)} DICOM series {list(series)}; expected one")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            if volume_suffix(path) in (".nii", ".nii.gz") and (why := _nifti_truncation(path)):
                raise VolumeError(f"{path}: cannot be read as a medical volume: truncated file ({why})")
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise VolumeError(f"{path}: cannot be read as a medical volume ({first_line})") from None
    return _from_sitk(image, str(path))


def to_sitk(volume: Volume) -> sitk.Image:
    """The volume as a SimpleITK image with the same geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in np.asarray(volume.direction, dtype=float).ravel()])
    return image


def write_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``volume`` atomically (temp file in the same folder, then rename).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        VolumeError: the file name has no supported ending.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not suffix:
        raise VolumeError(f"{path}: unsupported file ending; expected one of {', '.join(VOLUME_SUFFIXES)}")
    if suffix in (".nhdr", ".mhd"):
        raise VolumeError(f"{path}: detached headers cannot be written atomically; use .nrrd or .mha")
    with atomic_path(path, overwrite=overwrite) as tmp:
        sitk.WriteImage(to_sitk(volume), str(tmp), useCompression=True)
    return path
