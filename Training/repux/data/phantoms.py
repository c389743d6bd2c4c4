"""Synthetic abdominal CT phantoms with FLARE organ labels: a realistic stand-in for real data.

``make_phantom(seed)`` draws one patient (:class:`repux.data.anatomy.Anatomy`: body wall,
spine, ribs, lung bases, bowel, vessels, and spleen, kidneys, liver, pancreas with
overlapping CT numbers), places it in the scanner, and samples it on a grid with its own
spacing, origin and orientation, exactly as a file header would describe a real scan.
The image is int16 HU with partial-volume blur and correlated noise; the label (uint8,
values of :data:`PHANTOM_LABELS`) is sampled on the same grid, at the voxel centres.

The seed fixes the patient *and where it lies in patient space*; the grid only decides
where it is sampled. The same seed with two orientations therefore shows the same organs
at the same LPS positions, which is what geometry tests of the inference engine rely on.

Default grid, a trade-off for training on a CPU: the field of view is cropped to the body
with 170-200 voxels across the patient's width (in-plane spacing 1.7-2.4 mm, about a real
scanner's 0.7-0.9 mm binned by 2-3) and 2-3 mm slices from the lung bases to below the
kidneys: about 185 (across) x 140 (front to back) x 100 (slices) voxels, 2-3.5 M in all,
made in 2-4 s on one core. ``shape`` and ``spacing`` override it, e.g.
``shape=(512, 512, 200), spacing=(0.8, 0.8, 1.5)`` (about 12 s of CPU time, under 1 GB).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from repux.atomic import atomic_dir, refuse_replacing_working_folder, write_json
from repux.data.anatomy import Anatomy, axis_rotation
from repux.errors import InputError
from repux.imageio import Volume, write_volume
from repux.progress import Progress

#: Label value -> organ name, in the 3D UX-Net FLARE order (the "flare" label preset).
PHANTOM_LABELS = {0: "background", 1: "spleen", 2: "kidney", 3: "liver", 4: "pancreas"}

#: Default voxels across the patient's width (the in-plane spacing follows from the body size).
DEFAULT_WIDTH_VOXELS = (170, 200)
#: Default slice spacing range in mm.
DEFAULT_SLICE_SPACING = (2.0, 3.0)
#: Oblique rotations of the grid: angle range in degrees about a random axis.
OBLIQUE_DEGREES = (2.0, 10.0)
#: Standard deviation of the image noise in HU (drawn per phantom).
NOISE_HU = (10.0, 20.0)
#: Partial-volume blur: Gaussian sigma in voxels along each grid axis.
BLUR_VOXELS = 0.5

_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
_CHUNK_VOXELS = 1 << 21  # rendering works on slabs of about this many voxels (bounded memory)


def direction_from_code(code: str) -> np.ndarray:
    """The 3x3 LPS direction matrix of an axis code such as ``"LPS"``, ``"RAS"``, ``"PIR"``.

    Each letter names where its grid axis (i, j, k) points *to* (nibabel's convention):
    ``"LPS"`` is ITK's identity direction, ``"RAS"`` is ``diag(-1, -1, 1)``.

    Raises:
        InputError: not three letters covering R/L, A/P and S/I once each.
    """
    letters = str(code).upper()
    axes = [_LETTERS.get(c, (None, 0))[0] for c in letters]
    if len(letters) != 3 or None in axes or sorted(axes) != [0, 1, 2]:
        raise InputError(
            f"orientation {code!r}: expected three letters naming each of R/L, A/P and S/I once, e.g. 'LPS' or 'PIR'"
        )
    direction = np.zeros((3, 3))
    for column, letter in enumerate(letters):
        row, sign = _LETTERS[letter]
        direction[row, column] = sign
    return direction


def code_from_direction(direction: np.ndarray) -> str:
    """The axis code nearest to an LPS direction matrix (the inverse of :func:`direction_from_code`)."""
    direction = np.asarray(direction, dtype=float)
    names = {v: k for k, v in _LETTERS.items()}
    code = ""
    for column in direction.T:
        row = int(np.argmax(np.abs(column)))
        code += names[(row, 1 if column[row] > 0 else -1)]
    return code


def _triple(value: Any, name: str, kind: type) -> tuple | None:
    """Three positive numbers (``kind`` int: whole numbers >= 2), or None for None."""
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    whole = kind is not int or all(v.is_integer() and v >= 2 for v in values)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values) or not whole:
        need = (
            "three integers >= 2 (voxels along i, j, k)" if kind is int else "three positive numbers (mm along i, j, k)"
        )
        raise InputError(f"{name} {value!r}: expected {need}")
    return tuple(kind(v) for v in values)


def _orthonormal(direction: Any) -> np.ndarray:
    matrix = np.asarray(direction, dtype=float)
    if matrix.shape != (3, 3) or not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-6):
        raise InputError(
            f"orientation matrix {np.asarray(direction).tolist()}: expected a 3x3 matrix with orthonormal columns "
            "(the LPS directions of i, j, k)"
        )
    return matrix


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed {seed!r}: expected a non-negative integer")


def _settings(shape: Any, spacing: Any, orientation: Any) -> tuple[tuple | None, tuple | None, np.ndarray | None]:
    """Validated shape, spacing and orientation (None, or the direction before any tilt)."""
    shape, spacing = _triple(shape, "shape", int), _triple(spacing, "spacing", float)
    if orientation is None:
        return shape, spacing, None
    if isinstance(orientation, str):
        return shape, spacing, direction_from_code(orientation)
    return shape, spacing, _orthonormal(orientation)


def _random_axes(rng: np.random.Generator, shape: tuple | None, spacing: tuple | None) -> np.ndarray:
    """A random signed permutation whose slice axis (the grid axis along S-I) is sensible:
    the one with the largest spacing, else the fewest voxels, else a random one."""
    slice_draw, swap, signs = int(rng.integers(3)), bool(rng.integers(2)), rng.choice([-1.0, 1.0], size=3)
    slice_axis = slice_draw
    for values, pick in ((spacing, np.argmax), (shape, np.argmin)):
        if values is not None:
            extreme = pick(values)
            if sum(v == values[extreme] for v in values) == 1:
                slice_axis = int(extreme)
                break
    others = [g for g in range(3) if g != slice_axis]
    if swap:
        others.reverse()
    direction = np.zeros((3, 3))
    for anatomical, grid_axis in zip((0, 1, 2), (*others, slice_axis)):
        direction[anatomical, grid_axis] = signs[grid_axis]
    return direction


def _oblique(rng: np.random.Generator) -> np.ndarray:
    axis, angle, sign = rng.normal(size=3), rng.uniform(*OBLIQUE_DEGREES), rng.choice([-1.0, 1.0])
    return axis_rotation(axis, sign * np.deg2rad(angle))


def make_phantom(
    seed: int,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    oblique: bool = True,
    orientation: str | np.ndarray | None = None,
) -> tuple[Volume, Volume]:
    """One synthetic abdominal CT and its organ label.

    Args:
        seed: non-negative integer; fixes the patient, its position in patient space, the
            default grid, the orientation when not given, and the noise.
        shape: voxels along i, j, k; default: the body's extent over the spacing.
        spacing: mm along i, j, k; default: see the module docstring (with ``shape`` given
            alone, the spacing that makes that shape cover the body).
        oblique: tilt the grid by 2-10 degrees about a random axis (not with a matrix ``orientation``).
        orientation: an axis code (``"LPS"``, ``"RAS"``, ``"PIR"``, see :func:`direction_from_code`),
            a 3x3 LPS direction matrix used as it is, or None for a random signed permutation
            whose slice axis (along S-I) is the grid axis with the largest spacing, else the
            one with the fewest voxels, else a random one.

    Returns:
        ``(image, label)``: image int16 HU (air -1000), label uint8 with the values of
        :data:`PHANTOM_LABELS`; both with the same geometry, arrays indexed ``[i, j, k]``.

    Raises:
        InputError: a bad seed, shape, spacing or orientation.
    """
    _check_seed(seed)
    shape, spacing, axes = _settings(shape, spacing, orientation)
    # One independent stream per purpose, so choosing e.g. the orientation never changes the patient.
    anatomy_ss, placement_ss, axes_ss, tilt_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(5)
    anatomy = Anatomy(np.random.default_rng(anatomy_ss))

    placement = np.random.default_rng(placement_ss)
    body_position = np.array([placement.uniform(-20, 20), placement.uniform(-40, 40), placement.uniform(-700, -100)])
    grid_shift = placement.uniform(-8, 8, size=3)
    width_voxels = placement.uniform(*DEFAULT_WIDTH_VOXELS)
    slice_spacing = placement.uniform(*DEFAULT_SLICE_SPACING)

    if axes is None:
        axes = _random_axes(np.random.default_rng(axes_ss), shape, spacing)
    direction = axes
    if oblique and (orientation is None or isinstance(orientation, str)):
        direction = _oblique(np.random.default_rng(tilt_ss)) @ axes

    # Which anatomical axis (0 L-R, 1 A-P, 2 S-I) each grid axis runs along.
    anatomical = np.argmax(np.abs(axes), axis=0)
    extent = anatomy.fov_hi - anatomy.fov_lo
    if spacing is None and shape is None:
        inplane = extent[0] / width_voxels
        spacing = tuple(float((inplane, inplane, slice_spacing)[a]) for a in anatomical)
    elif spacing is None:
        spacing = tuple(float(extent[a] / n) for a, n in zip(anatomical, shape))
    if shape is None:
        shape = tuple(int(np.ceil(extent[a] / s)) for a, s in zip(anatomical, spacing))

    center = body_position + (anatomy.fov_lo + anatomy.fov_hi) / 2 + grid_shift
    linear = direction @ np.diag(spacing)
    origin = center - linear @ ((np.array(shape) - 1) / 2)

    noise_rng = np.random.default_rng(noise_ss)
    hu, label = _render(anatomy, shape, linear, origin - body_position, noise_rng)
    image = Volume(hu, tuple(spacing), tuple(float(o) for o in origin), direction.copy())
    return image, image.with_array(label)


def _render(
    anatomy: Anatomy, shape: tuple, linear: np.ndarray, offset: np.ndarray, noise_rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the anatomy into a grid whose voxel (i, j, k) sits at ``linear @ (i, j, k) + offset``
    in the body frame; then noise and partial-volume blur. Returns (int16 HU, uint8 label)."""
    hu = np.full(shape, -1000, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    inverse = np.linalg.inv(linear)
    rows = max(1, _CHUNK_VOXELS // (shape[1] * shape[2]))
    boxes = []
    for layer in anatomy.layers():
        corners = np.array(list(itertools.product(*zip(layer.lo, layer.hi))))
        index = (corners - offset) @ inverse.T
        start = np.clip(np.floor(index.min(axis=0)).astype(int), 0, shape)
        stop = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, shape)
        boxes.append((layer, start, stop))
    i = np.arange(shape[0], dtype=np.float32)[:, None, None]
    j = np.arange(shape[1], dtype=np.float32)[None, :, None]
    k = np.arange(shape[2], dtype=np.float32)[None, None, :]
    a = linear.astype(np.float32)
    for row in range(0, shape[0], rows):
        end = min(row + rows, shape[0])
        # Coordinates and body-wall depth once per slab; each layer paints a view of it.
        x, y, z = (a[r, 0] * i[row:end] + a[r, 1] * j + a[r, 2] * k + np.float32(offset[r]) for r in range(3))
        points = anatomy.points(x, y, z)
        for layer, start, stop in boxes:
            lo, hi = (max(start[0], row), *start[1:]), (min(stop[0], end), *stop[1:])
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            block = tuple(slice(low, h) for low, h in zip(lo, hi))
            local = (slice(lo[0] - row, hi[0] - row), *block[1:])
            layer.paint(hu[block], label[block], points[local])

    # White noise blurred together with the image gives CT-like correlated noise; scale it so
    # that the standard deviation after the blur is the drawn one.
    sigma = noise_rng.uniform(*NOISE_HU)
    radius = int(4.0 * BLUR_VOXELS + 0.5)  # scipy's kernel support for truncate=4
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / BLUR_VOXELS) ** 2)
    gain = float(np.sqrt((weights**2).sum()) / weights.sum()) ** 3
    for row in range(0, shape[0], rows):
        slab = hu[row : row + rows]
        slab += noise_rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(sigma / gain)
    ndimage.gaussian_filter(hu, BLUR_VOXELS, output=hu, mode="nearest")
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu).astype(np.int16), label


def _json_ready(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


#: ``dataset.json`` "generator" "module" of a dataset this module wrote: the mark of its own output.
GENERATOR_MODULE = "repux.data.phantoms"


def check_replaceable_dataset(out_dir: Path) -> None:
    """Refuse to replace ``out_dir`` unless it is exactly a phantom dataset this module wrote.

    Ours: a folder with a ``dataset.json`` whose generator is :data:`GENERATOR_MODULE` and
    nothing besides that file and the images and labels it lists; not the current folder.

    Raises:
        FileExistsError: naming the folder and what makes it not ours.
    """
    refuse_replacing_working_folder(out_dir)
    refusal = f"{out_dir}: not a phantom dataset written by repux make-phantoms"
    manifest_path = out_dir / "dataset.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        generator = manifest["generator"]["module"]
        listed = {Path(entry[key]) for entry in manifest["training"] for key in ("image", "label")}
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(f"{refusal} (no dataset.json of it); refusing to replace it, even with --force") from None
    if generator != GENERATOR_MODULE:
        raise FileExistsError(f"{refusal} (its generator is {generator!r}); refusing to replace it, even with --force")
    found = {
        path.relative_to(out_dir)
        for path in out_dir.rglob("*")
        if not path.is_dir() or path.relative_to(out_dir).parts[0] not in ("imagesTr", "labelsTr")
    }
    others = sorted(str(p) for p in found - listed - {Path("dataset.json")})
    if others:
        raise FileExistsError(
            f"{out_dir}: holds files that repux make-phantoms did not write ({', '.join(others[:5])}); "
            "refusing to replace it, even with --force"
        )


def write_phantom_dataset(
    n: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    **phantom_kwargs: Any,
) -> Path:
    """Write ``n`` phantoms as an MSD-style dataset folder and return its path.

    Layout: ``imagesTr/phantom_000.nii.gz``, ``labelsTr/phantom_000.nii.gz``, ... and
    ``dataset.json`` (``training`` pairs relative to the folder, ``labels``, ``modality``,
    ``numTraining`` and the generator's seed, per-case seeds and settings, so any case can
    be regenerated with :func:`make_phantom`). Case seeds come from one stream seeded by
    ``seed``: a larger ``n`` extends a smaller dataset with the same first cases.
    The folder is written under a temporary name and renamed when complete.

    Args:
        phantom_kwargs: passed to :func:`make_phantom` (shape, spacing, oblique, orientation).

    Raises:
        InputError: ``n`` below 1 or a bad phantom setting.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it is not a dataset
            this function wrote (:func:`check_replaceable_dataset`).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"number of phantoms {n!r}: expected an integer >= 1")
    _check_seed(seed)
    unknown = sorted(set(phantom_kwargs) - {"shape", "spacing", "oblique", "orientation"})
    if unknown:
        raise InputError(f"phantom settings {unknown}: unknown; expected shape, spacing, oblique or orientation")
    _settings(phantom_kwargs.get("shape"), phantom_kwargs.get("spacing"), phantom_kwargs.get("orientation"))
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists; refusing to overwrite it (use --force)")
        check_replaceable_dataset(out_dir)
    case_seeds = [int(s) for s in np.random.default_rng(int(seed)).integers(0, 2**31 - 1, size=n)]
    width = max(3, len(str(n - 1)))
    training = []
    if progress is not None:
        progress.stage("phantoms", total=n)
    # Resolved: '.' or 'x/..' have no name for the temporary sibling.
    with atomic_dir(out_dir.resolve(), overwrite=overwrite) as tmp:
        for index, case_seed in enumerate(case_seeds):
            name = f"phantom_{index:0{width}d}.nii.gz"
            image, label = make_phantom(case_seed, **phantom_kwargs)
            write_volume(image, tmp / "imagesTr" / name)
            write_volume(label, tmp / "labelsTr" / name)
            training.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
            if progress is not None:
                progress.update(index + 1, case=name)
        manifest = {
            "name": "RepUX phantoms",
            "description": "Synthetic abdominal CT phantoms (repux.data.phantoms) with FLARE organ labels",
            "reference": "synthetic; no patient data",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(value): name for value, name in PHANTOM_LABELS.items()},
            "numTraining": n,
            "numTest": 0,
            "training": training,
            "test": [],
            "generator": {
                "module": GENERATOR_MODULE,
                "seed": int(seed),
                "case_seeds": case_seeds,
                "settings": {key: _json_ready(value) for key, value in phantom_kwargs.items()},
            },
        }
        write_json(manifest, tmp / "dataset.json")
    return out_dir
