"""Reading and writing 3-D medical volumes with their exact geometry.

One representation for every format the project meets (NIfTI, NRRD, MetaImage, a DICOM
series folder): :class:`Volume`, a numpy array indexed ``[i, j, k]`` (the file's own voxel
order, fastest axis first) plus the geometry that maps voxel indices to patient space.
SimpleITK does the file work, so LPS/RAS conventions and NIfTI qform/sform handling are
ITK's, the same as 3D Slicer's.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from repux.atomic import atomic_path
from repux.errors import InputError
from repux.progress import run_cancellable

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
    spacing = image.GetSpacing()
    if not all(math.isfinite(size) and size > 0 for size in spacing):
        raise VolumeError(f"{source}: voxel size {spacing} mm; expected positive voxel sizes")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return Volume(array, tuple(image.GetSpacing()), tuple(image.GetOrigin()), direction)


@dataclass(frozen=True)
class _NiftiHeader:
    """What the checks need of a NIfTI-1 or NIfTI-2 header (sizes in voxels, pixdim in mm)."""

    endian: str
    sizes: tuple[int, ...]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]
    vox_offset: int
    qform_code: int
    sform_code: int

    @property
    def data_bytes(self) -> int:
        return math.prod(max(size, 1) for size in self.sizes) * max(self.bitpix, 0) // 8


#: NIfTI datatype codes of floating voxels -> numpy type (without byte order).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
#: Byte layout: (header size, dim, pixdim, datatype/bitpix, vox_offset, qform/sform codes).
_NIFTI_LAYOUTS = {
    348: {"dim": (40, "8h"), "pixdim": (76, "8f"), "types": (70, "2h"), "offset": (108, "f"), "codes": (252, "2h")},
    540: {"dim": (16, "8q"), "pixdim": (104, "8d"), "types": (12, "2h"), "offset": (168, "q"), "codes": (344, "2i")},
}


def _parse_nifti_header(header: bytes) -> _NiftiHeader | None:
    """The header's fields, or None when ``header`` does not start a NIfTI-1/2 header."""
    if len(header) < 4:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size in _NIFTI_LAYOUTS and len(header) >= size:
            break
    else:
        return None
    layout = _NIFTI_LAYOUTS[size]

    def field(name: str) -> tuple:
        offset, form = layout[name]
        return struct.unpack_from(endian + form, header, offset)

    dims = field("dim")
    ndim = max(0, min(int(dims[0]), 7))
    datatype, bitpix = field("types")
    qform_code, sform_code = field("codes")
    vox_offset = field("offset")[0]
    return _NiftiHeader(
        endian=endian,
        sizes=tuple(int(d) for d in dims[1 : 1 + ndim]),
        datatype=int(datatype),
        bitpix=int(bitpix),
        pixdim=tuple(float(v) for v in field("pixdim")),
        vox_offset=int(vox_offset) if math.isfinite(vox_offset) and vox_offset >= 0 else 0,
        qform_code=int(qform_code),
        sform_code=int(sform_code),
    )


def _nifti_geometry_problem(header: _NiftiHeader) -> str | None:
    """Why the header's geometry is not one that every common reader agrees on, or None."""
    if header.qform_code == 0 and header.sform_code == 0:
        # ITK (and so 3D Slicer) then takes LPS axes at the origin; nibabel takes Analyze's
        # x-flipped axes centred on the volume: the answer depends on the reader.
        return (
            "qform_code and sform_code are both 0, so the file states no orientation and readers disagree on its "
            "geometry (ITK and 3D Slicer: LPS axes at the origin; nibabel: flipped x axis, centred); expected a "
            "qform or sform (re-save it with the orientation set)"
        )
    for axis in range(1, 1 + min(3, len(header.sizes))):
        size = header.pixdim[axis]
        if not (math.isfinite(size) and size > 0):
            # ITK reads 0 as 1 mm and a negative size as a flip; other readers differ.
            return f"pixdim[{axis}] is {size:g}; expected a positive voxel size in mm"
    return None


def _check_nifti(path: Path) -> None:
    """Refuse a NIfTI file that ITK would read silently wrong.

    ITK reads a truncated NIfTI without complaint (missing voxels come back as zeros), turns
    NaN and Inf voxels into 0 and makes up a geometry when the header states none. So the
    header is checked here, the data length against it (vox_offset + voxels * bitpix / 8),
    and floating voxels for NaN/Inf, in one pass over the (decompressed) file.

    Raises:
        VolumeError: naming the file and what is wrong.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    refused = f"{path}: cannot be read as a medical volume"
    try:
        with opener(path, "rb") as stream:
            head = stream.read(540)
            if len(head) < 348:
                raise VolumeError(f"{refused}: truncated file (header is {len(head)} bytes; a NIfTI-1 header has 348)")
            header = _parse_nifti_header(head)
            if header is None:
                return  # not NIfTI-1/2: leave the verdict to ITK
            if why := _nifti_geometry_problem(header):
                raise VolumeError(f"{path}: {why}")
            length, non_finite = _scan_nifti_data(stream, head, header)
    except (EOFError, OSError, zlib.error) as error:
        raise VolumeError(f"{refused}: truncated file (compressed data is cut short: {error})") from None
    expected = header.vox_offset + header.data_bytes
    if length < expected:
        raise VolumeError(f"{refused}: truncated file (holds {length} bytes; its header describes {expected})")
    if non_finite:
        voxels = header.data_bytes * 8 // max(header.bitpix, 1)
        raise VolumeError(f"{path}: {non_finite} of {voxels} voxels are NaN or infinite; expected finite intensities")


def _scan_nifti_data(stream, head: bytes, header: _NiftiHeader) -> tuple[int, int]:
    """(bytes in the file, count of NaN/Inf voxels), reading the rest of ``stream`` chunk by chunk."""
    kind = _NIFTI_FLOATS.get(header.datatype)
    dtype = np.dtype(header.endian + kind) if kind else None
    start, stop = header.vox_offset, header.vox_offset + header.data_bytes
    length, non_finite, carry = 0, 0, b""
    chunk = head
    while chunk:
        if dtype is not None:
            # The part of this chunk inside the voxel data, whole voxels only (the rest carried over).
            low, high = max(start - length, 0), max(min(stop - length, len(chunk)), 0)
            if low < high:
                data = carry + chunk[low:high]
                whole = len(data) - len(data) % dtype.itemsize
                non_finite += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:whole], dtype=dtype))))
                carry = data[whole:]
        length += len(chunk)
        chunk = stream.read(1 << 22)
    return length, non_finite


def _text_header(path: Path, suffix: str) -> dict[str, str]:
    """The key/value fields of a MetaImage or NRRD header (lower-case keys), read from its text start."""
    with open(path, "rb") as stream:
        text = stream.read(1 << 16).decode("latin-1")
    fields: dict[str, str] = {}
    separator = "=" if suffix in (".mha", ".mhd") else ":"
    for line in text.splitlines()[1 if separator == ":" else 0 :]:
        if separator == ":" and not line.strip():
            break  # NRRD: a blank line ends the header
        key, found, value = line.partition(separator)
        if found and not key.startswith("#"):
            fields[key.strip().lower()] = value.strip().lstrip("=").strip()
        if key.strip() == "ElementDataFile":
            break
    return fields


#: Bytes per component of the MetaImage element types whose size does not depend on the platform.
_MET_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def _metaimage_truncation(path: Path, fields: dict[str, str]) -> str | None:
    """Why a MetaImage file with its data inside (``ElementDataFile = LOCAL``) is shorter than
    its header says, or None. ITK refuses such files with a misleading "No such file" reason."""
    if fields.get("elementdatafile", "").upper() != "LOCAL":
        return None
    with open(path, "rb") as stream:
        start = stream.read(1 << 16)
    marker = start.find(b"ElementDataFile")
    end = start.find(b"\n", marker)
    if marker < 0 or end < 0:
        return None
    held = path.stat().st_size - (end + 1)
    try:
        if fields.get("compresseddata", "false").lower() == "true":
            expected = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
        else:
            sizes = [int(v) for v in fields["dimsize"].split()]
            channels = int(fields.get("elementnumberofchannels", "1"))
            expected = math.prod(sizes) * channels * _MET_BYTES[fields["elementtype"]]
    except (KeyError, ValueError):
        return None  # ITK judges such headers
    if expected is not None and held < expected:
        return f"holds {held} bytes of voxel data; its header describes {expected}"
    return None


def _check_metaimage_dimensions(path: Path, fields: dict[str, str]) -> None:
    """Refuse a MetaImage whose NDims or DimSize ITK cannot survive: a negative or huge NDims
    crashes the reader (segmentation fault, found by fuzzing), so it never gets to see one."""
    ndims, sizes = fields.get("ndims", ""), fields.get("dimsize", "").split()
    if not (ndims.isdigit() and 1 <= int(ndims) <= 4):
        raise VolumeError(f"{path}: NDims {ndims!r}; expected 3 (a 3-D volume)")
    if len(sizes) != int(ndims) or not all(size.isdigit() and int(size) > 0 for size in sizes):
        raise VolumeError(f"{path}: DimSize {fields.get('dimsize', '')!r}; expected {ndims} positive integers")


def _check_text_header(path: Path, suffix: str) -> None:
    """Refuse a MetaImage or NRRD header with a zero or negative voxel size, and a truncated
    MetaImage file.

    ITK reads a negative ElementSpacing (or NRRD spacing) as a flip of that axis and a zero
    one as 1 mm; other readers do not, so such files have no agreed geometry.
    """
    keys = ("elementspacing", "elementsize") if suffix in (".mha", ".mhd") else ("spacings",)
    fields = _text_header(path, suffix)
    if suffix in (".mha", ".mhd"):
        _check_metaimage_dimensions(path, fields)
    if suffix == ".mha" and (why := _metaimage_truncation(path, fields)):
        raise VolumeError(f"{path}: cannot be read as a medical volume: truncated file ({why})")
    for key in keys:
        if key not in fields:
            continue
        for text in fields[key].split():
            try:
                size = float(text)
            except ValueError:
                raise VolumeError(f"{path}: header field {key} {fields[key]!r}: expected voxel sizes in mm") from None
            if math.isnan(size) and suffix in (".nrrd", ".nhdr"):
                continue  # NRRD: "nan" marks a non-spatial axis
            if not (math.isfinite(size) and size > 0):
                name = {"elementspacing": "ElementSpacing", "elementsize": "ElementSize"}.get(key, key)
                raise VolumeError(
                    f"{path}: {name} {fields[key]} has {text}; expected positive voxel sizes in mm "
                    "(readers disagree on what a zero or negative size means)"
                )


def _check_declared_size(path: Path) -> None:
    """Refuse a file whose header declares more voxel data than there is memory.

    A damaged or hostile header (``sizes: 100000 100000 1000``) would otherwise make ITK
    allocate the whole buffer before it finds the data short.
    """
    from repux.infer.memory import available_memory_bytes

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _itk_warnings_off():
        reader.ReadImageInformation()
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    declared = math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * (int(bits.group(1)) // 8 if bits else 8)
    available = available_memory_bytes()
    if available is not None and declared > available:
        raise VolumeError(
            f"{path}: its header declares {' x '.join(map(str, reader.GetSize()))} voxels "
            f"({declared / 1e9:.1f} GB), more than the {available / 1e9:.1f} GB of memory available; "
            "expected a volume that fits"
        )


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Silence ITK's own warnings (printed straight to the terminal), e.g. GDCM's "No Series
    were found" for every folder searched for DICOM; errors still raise."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder: its Series Instance UID, description and slice files."""

    uid: str
    description: str
    files: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.uid} ({self.description!r}, {len(self.files)} slices)"


def dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series directly in ``folder`` (none for a folder of other files)."""
    folder = str(folder)
    found = []
    with _itk_warnings_off():
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
            found.append(DicomSeries(uid, _series_description(files[0]) if files else "", files))
    return found


def _series_description(path: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        with _itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


def _read_dicom_folder(path: Path, series: str | None) -> sitk.Image:
    found = dicom_series(path)
    listing = "; ".join(item.describe() for item in found)
    if not found:
        raise VolumeError(f"{path}: folder holds no DICOM series; expected one CT series")
    if series is not None:
        chosen = [item for item in found if item.uid == series]
        if not chosen:
            raise VolumeError(f"{path}: --series {series}: no such series here; the folder holds {listing}")
    elif len(found) > 1:
        raise VolumeError(
            f"{path}: folder holds {len(found)} DICOM series: {listing}; expected one (choose one with --series UID)"
        )
    else:
        chosen = found
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen[0].files))
    with _itk_warnings_off():
        return run_cancellable(reader.Execute)


def read_volume(path: str | os.PathLike, series: str | None = None) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file, or a folder holding one DICOM series.

    Args:
        series: the Series Instance UID to read from a folder of several DICOM series.

    Raises:
        VolumeError: the path is missing, unreadable, truncated, not 3-D or not scalar, has
            a geometry that readers disagree on, or NaN/Inf voxels; a folder with no DICOM
            series, or several and no (or an unknown) ``series``.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            image = _read_dicom_folder(path, series)
        else:
            suffix = volume_suffix(path)
            if suffix in (".nii", ".nii.gz"):
                _check_nifti(path)
            elif suffix:
                _check_text_header(path, suffix)
            _check_declared_size(path)
            image = run_cancellable(lambda: sitk.ReadImage(str(path)))
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
    image = to_sitk(volume)
    with atomic_path(path, overwrite=overwrite) as tmp:
        run_cancellable(lambda: sitk.WriteImage(image, str(tmp), useCompression=True))
    return path
