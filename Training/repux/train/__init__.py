"""Training and fine-tuning RepUX-Net on curated cases, with the Bayesian frequency prior.

- :class:`TrainConfig`: every choice of a run (defaults: the paper's recipe); :data:`OPTIMIZERS`.
- :func:`train`: check the cases, train, validate, checkpoint, resume, export a bundle.
- Parts, one module each: :mod:`.preprocessing` (a case onto the model grid, shared with
  inference), :mod:`.dataset` (memory-bounded cache, reproducible random patches),
  :mod:`.model_setup` (fine-tune with label mapping, or from scratch), :mod:`.optimizers`,
  :mod:`.validation` (sliding-window Dice), :mod:`.checkpoint`, :mod:`.distributed` (torchrun),
  :mod:`.splits`, :mod:`.fft_conv` (large kernels by FFT while training).

The configuration imports without torch (``repux train --help`` stays fast); the loop is
imported on first use of :func:`train`.
"""

from __future__ import annotations

import importlib
from typing import Any

from repux.train.config import KERNEL_CONVS, OPTIMIZERS, SCRATCH_DEFAULTS, TrainConfig

_TORCH_PARTS = {"train": "trainer", "TrainResult": "trainer", "SELECTION": "trainer"}

__all__ = ["KERNEL_CONVS", "OPTIMIZERS", "SCRATCH_DEFAULTS", "SELECTION", "TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in _TORCH_PARTS:
        return getattr(importlib.import_module(f"repux.train.{_TORCH_PARTS[name]}"), name)
    raise AttributeError(f"module 'repux.train' has no attribute {name!r}")
