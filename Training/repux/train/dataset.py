"""Training data: preprocessed cases in a memory-bounded cache, and reproducible random patches.

Preprocessing a CT (reading, resampling) costs far more than drawing patches from it, so
preprocessed cases are kept in a least-recently-used cache whose size is bounded in bytes
(``--cache-mb``): the published code cached every case in full and exhausted host memory on
large sets. Images are held as float16 (the 0..1 window needs no more) to fit twice as many.

Every random draw of iteration ``t`` (which case, where the patches are, the augmentation)
depends only on the seed and ``t`` (and the rank), so a resumed run draws exactly what an
uninterrupted one would, without saving transform states.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, RandAffined, RandCropByPosNegLabeld, RandShiftIntensityd, SpatialPadd

from repux.train.preprocessing import PreparedCase


class VolumeCache:
    """Preprocessed cases by case id, least recently used dropped first; safe across threads.

    Args:
        load: preprocesses one case.
        max_bytes: bound on the bytes held; a case larger than the whole bound is not kept.
    """

    def __init__(self, load: Callable[[Any], PreparedCase], max_bytes: int) -> None:
        self._load = load
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, PreparedCase] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.loads = 0  # how many times a case was preprocessed (hits are free)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, case: Any) -> PreparedCase:
        """The preprocessed ``case`` (image as float32), from the cache or freshly loaded."""
        with self._lock:
            entry = self._entries.get(case.case_id)
            if entry is not None:
                self._entries.move_to_end(case.case_id)
        if entry is None:
            loaded = self._load(case)
            entry = PreparedCase(loaded.image.to(torch.float16), loaded.label, loaded.box)
            with self._lock:
                self.loads += 1
                self._store(case.case_id, entry)
        return PreparedCase(entry.image.to(torch.float32), entry.label, entry.box)

    def _store(self, key: str, entry: PreparedCase) -> None:
        if entry.nbytes > self.max_bytes or key in self._entries:
            return
        while self._bytes + entry.nbytes > self.max_bytes and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes


def sample_seed(seed: int, index: int) -> int:
    """A 32-bit seed for global sample ``index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def augmentation(patch_size: Sequence[int], samples_per_volume: int, pad_value: float = 0.0) -> Compose:
    """The paper's random transforms of one preprocessed ``{"image", "label"}`` case.

    Pads to at least one patch (the image with ``pad_value``, the label with 0), crops
    ``samples_per_volume`` patches centred on foreground and background voxels 1:1, shifts
    intensity by up to 0.1 (p 0.5) and applies a random affine to every patch (rotation up
    to pi/30 about the third axis, scale +-10%).
    """
    keys = ("image", "label")
    patch = tuple(int(p) for p in patch_size)
    return Compose(
        [
            SpatialPadd(keys="image", spatial_size=patch, value=pad_value),
            SpatialPadd(keys="label", spatial_size=patch),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=patch,
                pos=1,
                neg=1,
                num_samples=samples_per_volume,
                image_key="image",
                image_threshold=0,
            ),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandAffined(
                keys=keys,
                mode=("bilinear", "nearest"),
                prob=1.0,
                spatial_size=patch,
                rotate_range=(0, 0, math.pi / 30),
                scale_range=(0.1, 0.1, 0.1),
                padding_mode="zeros",
            ),
        ]
    )


class PatchSampler:
    """Batches of random patches for each iteration, reproducible from (seed, iteration, rank).

    Iteration ``t`` on rank ``r`` of ``world_size`` takes the volumes with global sample
    indices ``(t * world_size + r) * batch_size + j``; index ``g`` is case ``g % n`` of the
    training cases shuffled by epoch ``g // n``, so each epoch visits every case once and
    ranks see different cases in the same step.
    """

    def __init__(
        self,
        cache: VolumeCache,
        cases: Sequence[Any],
        patch_size: Sequence[int],
        batch_size: int = 1,
        samples_per_volume: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_value: float = 0.0,
    ) -> None:
        self.cache = cache
        self.cases = list(cases)
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._augment = augmentation(patch_size, samples_per_volume, pad_value)
        self._epoch_orders: dict[int, np.ndarray] = {}

    def case_for(self, index: int) -> Any:
        """The case drawn for global sample ``index``."""
        n = len(self.cases)
        epoch, position = divmod(index, n)
        order = self._epoch_orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._epoch_orders = {epoch: order}  # only the current epoch is needed
        return self.cases[order[position]]

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches for ``iteration`` (0-based).

        Returns:
            images: float32 (batch_size * samples_per_volume, 1, *patch_size).
            labels: int64 (batch_size * samples_per_volume, 1, *patch_size).
        """
        images, labels = [], []
        for j in range(self.batch_size):
            index = (iteration * self.world_size + self.rank) * self.batch_size + j
            case = self.cache.get(self.case_for(index))
            self._augment.set_random_state(seed=sample_seed(self.seed, index))
            for patch in self._augment({"image": case.image, "label": case.label.to(torch.float32)}):
                images.append(_plain(patch["image"]))
                labels.append(_plain(patch["label"]).round().to(torch.int64))
        return torch.stack(images), torch.stack(labels)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # MONAI returns MetaTensors; their metadata is not needed and slows stacking and the network.
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
