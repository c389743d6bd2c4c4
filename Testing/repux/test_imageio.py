"""repux.imageio: every format keeps the exact geometry; bad files get clear errors."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from repux.errors import InputError
from repux.imageio import Volume, VolumeError, read_volume, to_sitk, write_volume


def _oblique_volume(rng: np.random.Generator) -> Volume:
    angle = 0.3
    rotation = np.array(
        [[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]]
    )
    direction = rotation @ np.diag([-1.0, 1.0, -1.0])  # flipped axes on top of the rotation
    array = rng.integers(-1000, 1000, size=(7, 5, 4)).astype(np.int16)
    return Volume(array, (0.7, 0.9, 2.5), (10.0, -20.5, 33.0), direction)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_values_and_geometry(tmp_path: Path, suffix: str) -> None:
    volume = _oblique_volume(np.random.default_rng(0))
    path = write_volume(volume, tmp_path / f"ct{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.same_geometry(volume)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_array_is_indexed_i_j_k_like_the_file(tmp_path: Path) -> None:
    # Write with SimpleITK directly: voxel (i=3, j=1, k=0) set; sitk indexes (x, y, z).
    image = sitk.Image(6, 4, 2, sitk.sitkUInt8)
    image.SetPixel(3, 1, 0, 7)
    sitk.WriteImage(image, str(tmp_path / "x.nrrd"))
    volume = read_volume(tmp_path / "x.nrrd")
    assert volume.shape == (6, 4, 2)
    assert volume.array[3, 1, 0] == 7


def test_ras_affine_matches_lps_geometry() -> None:
    volume = _oblique_volume(np.random.default_rng(1))
    index = np.array([2.0, 3.0, 1.0, 1.0])
    lps = volume.affine_lps @ index
    ras = volume.affine @ index
    np.testing.assert_allclose(ras[:3], lps[:3] * np.array([-1.0, -1.0, 1.0]))
    rebuilt = Volume.from_affine(volume.array, volume.affine)
    assert rebuilt.same_geometry(volume, tol=1e-9)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    volume = _oblique_volume(np.random.default_rng(2))
    path = write_volume(volume, tmp_path / "a.nrrd")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="a.nrrd"):
        write_volume(volume.with_array(volume.array + 1), path)
    assert path.read_bytes() == before
    write_volume(volume.with_array(volume.array + 1), path, overwrite=True)
    np.testing.assert_array_equal(read_volume(path).array, volume.array + 1)


def test_missing_truncated_and_non_volume_files(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")
    good = write_volume(_oblique_volume(np.random.default_rng(3)), tmp_path / "good.nii")
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(VolumeError, match="truncated.nii.*cannot be read"):
        read_volume(truncated)
    text = tmp_path / "notes.nrrd"
    text.write_text("hello")
    with pytest.raises(InputError, match="notes.nrrd"):
        read_volume(text)


def test_2d_and_vector_images_are_refused(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(VolumeError, match=r"slice.nrrd.*2-D.*expected a 3-D volume"):
        read_volume(tmp_path / "slice.nrrd")
    sitk.WriteImage(sitk.Image(8, 8, 1, sitk.sitkInt16), str(tmp_path / "thin.nrrd"))
    with pytest.raises(VolumeError, match=r"thin.nrrd.*single slice"):
        read_volume(tmp_path / "thin.nrrd")
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(VolumeError, match=r"rgb.nrrd.*3 components"):
        read_volume(tmp_path / "rgb.nrrd")
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(tmp_path / "series.nrrd"))
    with pytest.raises(VolumeError, match=r"series.nrrd.*4-D"):
        read_volume(tmp_path / "series.nrrd")


def test_dicom_series_folder(tmp_path: Path) -> None:
    volume = _oblique_volume(np.random.default_rng(4))
    volume = Volume(volume.array, (0.7, 0.9, 2.5), (10.0, -20.5, 33.0), np.eye(3))
    image = sitk.Cast(to_sitk(volume), sitk.sitkInt16)
    series = tmp_path / "dicom"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        piece.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        piece.SetMetaData("0020|0013", str(k))
        piece.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        piece.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(series / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    back = read_volume(series)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_volume(empty)


def test_truncated_compressed_nifti_is_refused(tmp_path: Path) -> None:
    good = write_volume(_oblique_volume(np.random.default_rng(5)), tmp_path / "good.nii.gz")
    data = good.read_bytes()
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"cut.nii.gz.*truncated"):
        read_volume(truncated)


def _patched_nifti(tmp_path: Path, name: str, patches: dict[int, bytes], array: np.ndarray | None = None) -> Path:
    """A NIfTI-1 file written by ITK, then with header bytes replaced at the given offsets."""
    import gzip

    volume = _oblique_volume(np.random.default_rng(6))
    if array is not None:
        volume = volume.with_array(array)
    plain = write_volume(volume, tmp_path / f"plain-{name.replace('.', '-')}.nii")
    data = bytearray(plain.read_bytes())
    for offset, value in patches.items():
        data[offset : offset + len(value)] = value
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
    return path


def test_nifti_without_qform_and_sform_is_refused(tmp_path: Path) -> None:
    """Both codes 0: ITK (and Slicer) take LPS axes at the origin, nibabel Analyze's flipped x axis,
    centred: no answer agrees with every common reader, so the file is refused."""
    import struct

    for name in ("nocodes.nii", "nocodes.nii.gz"):
        path = _patched_nifti(tmp_path, name, {252: struct.pack("<hh", 0, 0)})
        with pytest.raises(VolumeError, match=rf"{name}.*qform_code and sform_code are both 0"):
            read_volume(path)
    # One code set is enough.
    assert read_volume(_patched_nifti(tmp_path, "qform.nii", {252: struct.pack("<hh", 1, 0)})).shape == (7, 5, 4)


@pytest.mark.parametrize("value", [0.0, -0.9])
def test_nifti_with_zero_or_negative_pixdim_is_refused(tmp_path: Path, value: float) -> None:
    import struct

    path = _patched_nifti(tmp_path, "pixdim.nii", {80 + 4: struct.pack("<f", value)})
    with pytest.raises(VolumeError, match=rf"pixdim.nii.*pixdim\[2\] is {value:g}.*positive"):
        read_volume(path)


def test_negative_spacing_in_metaimage_and_nrrd_is_refused(tmp_path: Path) -> None:
    volume = _oblique_volume(np.random.default_rng(7))
    mha = write_volume(Volume(volume.array, (1.5, 2.0, 2.5), (0.0, 0.0, 0.0)), tmp_path / "good.mha")
    text = mha.read_bytes()
    assert b"ElementSpacing = 1.5 2 2.5\n" in text
    bad = tmp_path / "negative.mha"
    bad.write_bytes(text.replace(b"ElementSpacing = 1.5 2 2.5\n", b"ElementSpacing = 1.5 -2 2.5\n"))
    with pytest.raises(VolumeError, match=r"negative.mha.*ElementSpacing.*-2.*positive"):
        read_volume(bad)
    zero = tmp_path / "zero.mha"
    zero.write_bytes(text.replace(b"ElementSpacing = 1.5 2 2.5\n", b"ElementSpacing = 1.5 0 2.5\n"))
    with pytest.raises(VolumeError, match=r"zero.mha.*ElementSpacing.*positive"):
        read_volume(zero)
    nrrd = tmp_path / "spacings.nrrd"
    header = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nspacings: 1 -1 1\nencoding: raw\nendian: little\n\n"
    nrrd.write_bytes(header + bytes(16))
    with pytest.raises(VolumeError, match=r"spacings.nrrd.*spacings.*-1.*positive"):
        read_volume(nrrd)



@pytest.mark.parametrize("name", ["nan.nii", "nan.nii.gz", "nan.nrrd", "nan.mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_in_every_format(tmp_path: Path, name: str, bad: float) -> None:
    """ITK's NIfTI reader turns NaN and Inf into 0: the file itself is checked."""
    from repux.infer import check_image

    volume = _oblique_volume(np.random.default_rng(8))
    array = volume.array.astype(np.float32)
    array[3, 2, 1] = bad
    path = write_volume(volume.with_array(array), tmp_path / name)
    with pytest.raises(InputError, match=rf"{name}.*1 of 140 voxels are NaN or infinite"):
        check_image(read_volume(path), str(path))


def test_header_declaring_more_data_than_memory_is_refused_before_reading(tmp_path: Path) -> None:
    """A gzip NRRD whose sizes claim 20 TB: refused from the header, not by a failed allocation."""
    path = tmp_path / "huge.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 1000\nencoding: gzip\nendian: little\n\n")
    with pytest.raises(VolumeError, match=r"huge.nrrd: its header declares 100000 x 100000 x 1000 voxels \(20000.0 GB\)"):
        read_volume(path)


@pytest.mark.parametrize("name", ["cut.mha", "cut-raw.mha", "cut.nrrd", "cut-raw.nrrd"])
def test_truncated_metaimage_and_nrrd_are_refused_as_truncated(tmp_path: Path, name: str) -> None:
    """Every format the README lists: a file cut short is refused and said to be truncated."""
    array = np.random.default_rng(9).integers(-1000, 1000, size=(40, 40, 30)).astype(np.int16)
    image = to_sitk(Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    whole = tmp_path / f"whole-{name}"
    sitk.WriteImage(image, str(whole), useCompression="raw" not in name)
    data = whole.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * 0.9)])
    reason = r"(truncated|expected \d+ bytes|fread got only)"
    with pytest.raises(VolumeError, match=rf"{name}: cannot be read as a medical volume.*{reason}"):
        read_volume(cut)


@pytest.mark.parametrize("ndims", ["-1", "100", "99999999999", "abc"])
def test_metaimage_with_an_impossible_ndims_is_refused_not_crashing(tmp_path: Path, ndims: str) -> None:
    """Found by fuzzing: ITK's MetaImage reader dies (segmentation fault) on a negative or huge NDims.
    Run in a child process, so that a crash fails this test instead of ending the test run."""
    import subprocess
    import sys

    good = write_volume(_oblique_volume(np.random.default_rng(10)), tmp_path / "good.mha")
    bad = tmp_path / "ndims.mha"
    bad.write_bytes(good.read_bytes().replace(b"NDims = 3\n", f"NDims = {ndims}\n".encode()))
    script = (
        "import sys\nfrom repux.imageio import VolumeError, read_volume\n"
        "try:\n    read_volume(sys.argv[1])\nexcept VolumeError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert f"ndims.mha: NDims '{ndims}'; expected 3" in done.stdout
