"""Importing a published ``.pth`` checkpoint (RepUX-Net or 3D UX-Net) as a bundle, once.

The file is read with ``torch.load(weights_only=True)`` only: tensors and plain containers,
never code. Accepted layouts: a raw state_dict (what the published code saves), the
wrappers ``{"state_dict": ...}``, ``{"model": ...}`` and ``{"model_state_dict": ...}``, and
keys prefixed ``module.`` (saved from DataParallel/DistributedDataParallel).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from repux import __version__
from repux.bundle.errors import BundleError
from repux.bundle.labels import Label
from repux.bundle.metadata import BundleMetadata, default_inference, default_preprocessing
from repux.bundle.store import check_output_folder, json_form, save_bundle
from repux.errors import InputError
from repux.network import config_from_state_dict

#: Keys under which training scripts commonly nest the state_dict.
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")
_DATA_PARALLEL_PREFIX = "module."


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a ``.pth`` file, unwrapped and without a ``module.`` prefix.

    Raises:
        BundleError: the file needs code to be unpickled (refused), is not a PyTorch
            checkpoint (text, truncated, corrupted), or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: file not found (expected a PyTorch checkpoint, .pth)")
    if path.stat().st_size == 0:
        raise BundleError(f"{path}: the file is empty (expected a PyTorch checkpoint, .pth)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse an untrusted file means "unusable"
        raise _load_error(path, error) from None
    return _unwrap(loaded, path)


def _load_error(path: Path, error: Exception) -> BundleError:
    message = str(error)
    if "Weights only load failed" in message:
        needed = re.search(r"GLOBAL (\S+)", message)
        what = f" ({needed.group(1)})" if needed else ""
        return BundleError(
            f"{path}: refusing to load: the file is a pickle that needs code{what} to be rebuilt, "
            "and running code from a model file is unsafe; only plain tensors and containers are "
            "accepted. Save just the weights, torch.save(model.state_dict(), path), and import that file"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return BundleError(
        f"{path}: not a readable PyTorch checkpoint (truncated, corrupted or another kind of file): {first_line}"
    )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and len(value) > 0 and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()
    )


def _unwrap(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    state_dict = loaded if _is_state_dict(loaded) else None
    if state_dict is None and isinstance(loaded, dict):
        for key in STATE_DICT_WRAPPERS:
            if _is_state_dict(loaded.get(key)):
                state_dict = loaded[key]
                break
    if state_dict is None:
        found = type(loaded).__name__
        if isinstance(loaded, dict):
            found = f"a dict with keys {sorted(map(str, loaded))[:8]}"
        raise BundleError(
            f"{path}: no state_dict found (expected a dict of tensors, or one under "
            f"{', '.join(repr(k) for k in STATE_DICT_WRAPPERS)}), got {found}"
        )
    if all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state_dict):
        state_dict = {key[len(_DATA_PARALLEL_PREFIX) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_checkpoint(
    checkpoint: str | os.PathLike,
    arch: str,
    labels: Sequence[Label],
    out_dir: str | os.PathLike,
    *,
    spacing: Sequence[float],
    patch_size: Sequence[int] = (96, 96, 96),
    name: str | None = None,
    description: str = "",
    command: str | None = None,
    force: bool = False,
    weights_dtype: str = "float32",
    expected_network: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle of a published checkpoint: its weights, network config and ``labels``.

    The network config (widths, depths, kernel size, output channels) is read off the weight
    shapes and must give one output channel per label, and equal ``expected_network`` when
    given. Preprocessing is the published CT recipe at ``spacing`` (mm, RAS x y z) with
    ``patch_size`` windows, and inference the published defaults, unless ``preprocessing`` /
    ``inference`` (model.json form) are given. Provenance records the file name, its SHA-256,
    ``command`` and the entries of ``provenance``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``force`` is False.
        BundleError: unreadable or unsafe checkpoint, wrong architecture, label count mismatch.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_output_folder(out_dir, force)  # before reading a possibly large file
    state_dict = read_checkpoint(checkpoint)
    try:
        config = config_from_state_dict(arch, state_dict)
    except InputError as error:
        raise BundleError(f"{checkpoint}: {error}") from None
    config.pop("arch", None)
    if expected_network is not None:
        differing = {key: (value, config.get(key)) for key, value in expected_network.items() if json_form(config.get(key)) != json_form(value)}
        if differing:
            shown = ", ".join(f"{key} {want} (the file has {got})" for key, (want, got) in differing.items())
            raise BundleError(f"{checkpoint}: expected a {arch} network with {shown}")
    if config["out_chans"] != len(labels):
        raise BundleError(
            f"{checkpoint}: the network has {config['out_chans']} output channels but the labels "
            f"give {len(labels)} (background included); expected one label per output channel"
        )
    metadata = BundleMetadata(
        name=name or checkpoint.stem,
        architecture=arch,
        network=config,
        labels=list(labels),
        description=description,
        preprocessing=preprocessing or default_preprocessing(tuple(spacing), tuple(patch_size)),
        inference=inference or default_inference(),
        provenance={
            "source": f"imported from the checkpoint {checkpoint.name}",
            "source_file": checkpoint.name,
            "source_sha256": file_sha256(checkpoint),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "repux_version": __version__,
            **({"command": command} if command else {}),
            **(provenance or {}),
        },
    )
    return save_bundle(state_dict, metadata, out_dir, force=force, weights_dtype=weights_dtype)
