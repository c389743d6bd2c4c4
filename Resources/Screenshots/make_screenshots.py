"""Make the extension's screenshots from a real ``repux segment`` result, rendered off-screen with VTK.

    python Resources/Screenshots/make_screenshots.py [--model demo] [--seed 1000] [--out Resources/Screenshots]

1. A synthetic abdominal CT phantom (``repux.data.phantoms``; no patient data) is written to a
   temporary folder and segmented by ``repux segment`` in a subprocess, as a user would.
2. ``RepUXSegment-1.png``: an axial CT slice through the organs (soft-tissue window W 400 /
   L 40) with the segmentation as a coloured overlay and outlines, in Slicer's orientation
   (patient right on the left, anterior on top), with a legend.
3. ``RepUXSegment-2.png``: the organs as smoothed surfaces with the spine and ribs, seen from
   the front as in Slicer's 3D view.

The caption names the model and says that the CT is a phantom. Needs an OpenGL that VTK can
render to off-screen (EGL or OSMesa; ``vtkRenderWindow`` picks it when there is no display).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from repux.bundle import load_bundle
from repux.data.phantoms import make_phantom
from repux.imageio import read_volume, write_volume

SIZE = (1000, 620)
SOFT_TISSUE = (-160.0, 240.0)  # HU, W 400 / L 40
OPACITY = 0.45
BONE_HU = 250.0


def image_data(array: np.ndarray, affine: np.ndarray) -> vtk.vtkImageData:
    """A vtkImageData in RAS mm for an axis-aligned volume (array [i, j, k], diagonal affine)."""
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or (np.diag(affine)[:3] <= 0).any():
        raise ValueError("expected an axis-aligned RAS grid")
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    image.SetSpacing(*np.diag(affine)[:3])
    image.SetOrigin(*affine[:3, 3])
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    return image


def text_actor(text: str, position: tuple[int, int], size: int = 18, colour=(1.0, 1.0, 1.0)) -> vtk.vtkTextActor:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.SetDisplayPosition(*position)
    actor.GetTextProperty().SetFontSize(size)
    actor.GetTextProperty().SetColor(*colour)
    return actor


def add_legend(renderer: vtk.vtkRenderer, labels, caption: str) -> None:
    renderer.AddViewProp(text_actor(caption, (12, SIZE[1] - 30), 18))
    for row, label in enumerate(labels):
        y = SIZE[1] - 70 - 26 * row
        renderer.AddViewProp(text_actor(label.name, (16, y), 20, tuple(c / 255 for c in label.color)))


def save(window: vtk.vtkRenderWindow, path: Path) -> None:
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    temporary = path.with_name(f".{path.name}.tmp.png")
    writer.SetFileName(str(temporary))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    temporary.replace(path)


def new_window() -> tuple[vtk.vtkRenderWindow, vtk.vtkRenderer]:
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*SIZE)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.0, 0.0, 0.0)
    window.AddRenderer(renderer)
    return window, renderer


def axial_overlay(ct: np.ndarray, labels: np.ndarray, palette: np.ndarray, k: int) -> np.ndarray:
    """RGB of axial slice ``k``: CT in the soft-tissue window, labels blended, outlines solid."""
    low, high = SOFT_TISSUE
    grey = np.clip((ct[:, :, k].astype(np.float32) - low) / (high - low), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    plane = labels[:, :, k]
    inside = plane > 0
    rgb[inside] = (1 - OPACITY) * rgb[inside] + OPACITY * palette[plane[inside]]
    edge = np.zeros_like(inside)
    edge[1:, :] |= plane[1:, :] != plane[:-1, :]
    edge[:, 1:] |= plane[:, 1:] != plane[:, :-1]
    edge &= inside
    rgb[edge] = palette[plane[edge]]
    return rgb.astype(np.uint8)


def slice_screenshot(ct, labels, organs, caption: str, path: Path) -> None:
    palette = np.zeros((int(labels.array.max(initial=0)) + 1 + len(organs), 3))
    for label in organs:
        palette[label.value] = label.color
    counts = (labels.array > 0).sum(axis=(0, 1))
    k = int(np.argmax(counts))  # the axial slice with the most organ voxels
    rgb = axial_overlay(ct.array, labels.array, palette, k)
    spacing = np.diag(ct.affine)[:3]
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[0], rgb.shape[1], 1)
    image.SetSpacing(spacing[0], spacing[1], 1.0)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(rgb.transpose(1, 0, 2)).reshape(-1, 3), deep=True))
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    window, renderer = new_window()
    renderer.AddActor(actor)
    # Slicer's axial view: seen from the feet, anterior up, so the patient's right is on the left.
    camera = renderer.GetActiveCamera()
    centre = np.array(image.GetCenter())
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre - np.array([0.0, 0.0, 1000.0])))
    camera.SetViewUp(0.0, 1.0, 0.0)
    camera.ParallelProjectionOn()
    renderer.ResetCamera()
    camera.SetParallelScale(0.52 * rgb.shape[1] * spacing[1])
    add_legend(renderer, organs, caption + f" - axial slice {k}")
    save(window, path)


def surface_screenshot(ct, labels, organs, caption: str, path: Path) -> None:
    window, renderer = new_window()
    renderer.SetBackground(0.06, 0.07, 0.12)
    bone = image_data((ct.array > BONE_HU).astype(np.uint8), ct.affine)
    label_image = image_data(labels.array.astype(np.uint8), labels.affine)
    surfaces = [(bone, 1, (0.95, 0.92, 0.84), 0.35)] + [
        (label_image, label.value, tuple(c / 255 for c in label.color), 1.0) for label in organs
    ]
    for image, value, colour, opacity in surfaces:
        contour = vtk.vtkDiscreteFlyingEdges3D()
        contour.SetInputData(image)
        contour.SetValue(0, value)
        smooth = vtk.vtkWindowedSincPolyDataFilter()
        smooth.SetInputConnection(contour.GetOutputPort())
        smooth.SetNumberOfIterations(20)
        smooth.SetPassBand(0.05)
        smooth.NonManifoldSmoothingOn()
        smooth.NormalizeCoordinatesOn()
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputConnection(smooth.GetOutputPort())
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*colour)
        actor.GetProperty().SetOpacity(opacity)
        actor.GetProperty().SetSpecular(0.2)
        renderer.AddActor(actor)
    # Slicer's 3D view: from the front (anterior), superior up.
    camera = renderer.GetActiveCamera()
    found = np.argwhere(labels.array > 0)
    centre = (labels.affine @ np.append(found.mean(axis=0), 1.0))[:3]
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + np.array([0.0, 900.0, 0.0])))
    camera.SetViewUp(0.0, 0.0, 1.0)
    camera.Azimuth(-20)
    camera.Elevation(10)
    renderer.ResetCameraClippingRange()
    camera.Zoom(1.2)
    add_legend(renderer, organs, caption + " - 3D view")
    save(window, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="bundle folder or 'demo' (default)")
    parser.add_argument("--seed", type=int, default=1000, help="phantom seed (default 1000, not a training seed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="repux-screenshots-"))
    image, _ = make_phantom(args.seed, shape=(256, 256, 110), spacing=(1.4, 1.4, 2.5), oblique=False, orientation="RAS")
    ct_path = write_volume(image, work / "ct.nii.gz")
    labels_path = work / "labels.nii.gz"
    subprocess.run(
        [sys.executable, "-m", "repux", "segment", str(ct_path), "-o", str(labels_path), "--model", args.model, "--progress", "none"],
        check=True,
    )
    ct, labels = read_volume(ct_path), read_volume(labels_path)
    metadata = load_bundle(args.model).metadata
    organs = [label for label in metadata.labels if label.value != 0]
    caption = f"RepUX Segment, model '{metadata.name}' on a synthetic CT phantom (not patient data)"
    args.out.mkdir(parents=True, exist_ok=True)
    slice_screenshot(ct, labels, organs, caption, args.out / "RepUXSegment-1.png")
    surface_screenshot(ct, labels, organs, caption, args.out / "RepUXSegment-2.png")
    print(f"wrote {args.out / 'RepUXSegment-1.png'} and {args.out / 'RepUXSegment-2.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
