"""One curated case (CT and label map) on the model's grid, exactly as inference will see the CT.

The image goes through :func:`repux.infer.preprocess.preprocess` itself (reorientation to
the bundle's orientation, resampling to its spacing, crop to the body, intensity window,
padding to the patch grid), so a model trains on the inputs it will later be given. The
label map follows the same reorientation, grid (nearest-neighbour), crop and padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repux.imageio import Volume
from repux.infer.grid import resample
from repux.infer.preprocess import PreprocessingConfig, preprocess


@dataclass
class PreparedCase:
    """A case on the model grid.

    Attributes:
        image: (1, X, Y, Z) windowed intensities, padded to at least the patch size.
        label: (1, X, Y, Z) label values on the same grid (0 in the padding), uint8
            (int16 when a value exceeds 255).
        box: the slices of (X, Y, Z) holding the case itself (without the padding), where
            validation measures Dice.
    """

    image: torch.Tensor
    label: torch.Tensor
    box: tuple[slice, slice, slice]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.image, self.label))


def prepare_case(image: Volume, label: Volume, preprocessing: Mapping[str, Any]) -> PreparedCase:
    """Bring one case onto the model grid of a bundle's ``preprocessing`` (``model.json`` form).

    ``image`` and ``label`` must share their voxel grid (``repux.data.cases.check_cases``
    makes sure before training starts).
    """
    config = PreprocessingConfig.from_metadata(dict(preprocessing))
    pre = preprocess(image, config)
    values = torch.from_numpy(np.ascontiguousarray(pre.reorientation.apply(label.array), dtype=np.float32))[None]
    on_grid = resample(values, pre.input_grid, pre.model_grid, mode="nearest", fill=0.0)[0]
    crop = on_grid[tuple(slice(a, a + n) for a, n in zip(pre.crop_start, pre.crop_shape))]
    box = tuple(slice(b, b + n) for b, n in zip(pre.pad_before, pre.crop_shape))
    padded = torch.zeros(pre.image.shape[2:], dtype=torch.float32)
    padded[box] = crop
    dtype = torch.uint8 if float(padded.max()) <= 255 else torch.int16
    return PreparedCase(pre.image[0].contiguous(), padded.round().to(dtype)[None].contiguous(), box)  # type: ignore[arg-type]
