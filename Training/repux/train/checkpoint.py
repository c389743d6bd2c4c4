"""Training checkpoints in the work dir: everything needed to continue a run exactly where it stopped.

``checkpoint.pt`` holds the network and optimizer states (the frequency prior and moments
of BFR-AdamW included), the number of finished iterations, the best validation result so
far, the validation history, the random number generator states and the settings that
must not change on resume. It contains only tensors and plain Python values, so it loads
with ``torch.load(..., weights_only=True)``: nothing in it can execute code. The best
network so far is kept beside it as ``best.safetensors``. Both are written atomically: a
kill at any moment leaves the previous complete file.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from repux.atomic import atomic_path
from repux.errors import InputError

CHECKPOINT_FILE = "checkpoint.pt"
BEST_WEIGHTS_FILE = "best.safetensors"
#: Version of the checkpoint layout; a newer one is refused.
CHECKPOINT_FORMAT = 1


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators back to a :func:`rng_state` (CUDA only when the device count matches)."""
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(workdir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain values only) as the work dir's checkpoint, atomically."""
    path = Path(workdir) / CHECKPOINT_FILE
    with atomic_path(path, overwrite=True) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    return path


def load_checkpoint(workdir: Path) -> dict[str, Any] | None:
    """The work dir's checkpoint, or None when there is none.

    Raises:
        InputError: the file cannot be read or was written by a newer layout.
    """
    path = Path(workdir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for damaged files
        raise InputError(f"{path}: cannot be read as a training checkpoint ({error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{path}: checkpoint format {found!r}; expected {CHECKPOINT_FORMAT}")
    return state


def save_best_weights(workdir: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """Keep the best network so far as ``best.safetensors`` in the work dir, atomically."""
    path = Path(workdir) / BEST_WEIGHTS_FILE
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    with atomic_path(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp))
    return path


def load_best_weights(workdir: Path) -> dict[str, torch.Tensor]:
    """The best network's weights kept in the work dir.

    Raises:
        FileNotFoundError: the file is gone (the checkpoint says a best network was kept).
    """
    path = Path(workdir) / BEST_WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: the best network of this run is missing from the work dir")
    return load_file(str(path))


def clear_run_files(workdir: Path) -> None:
    """Remove a previous run's checkpoint and best weights (only the files this module writes)."""
    for name in (CHECKPOINT_FILE, BEST_WEIGHTS_FILE):
        (Path(workdir) / name).unlink(missing_ok=True)
