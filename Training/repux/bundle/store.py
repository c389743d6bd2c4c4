"""Bundle folders on disk: ``model.json`` + ``model.safetensors``, saved atomically, loaded strictly.

Loading checks the metadata and every weight's name, shape and kind (floating or integer)
against the network that ``model.json`` describes, built on torch's "meta" device (no memory,
no computation); the weights themselves are read only when a network is built. Weights may
be stored as float16 (half the size); they are cast back to float32 when read.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from repux.atomic import atomic_dir
from repux.bundle.errors import BundleError
from repux.bundle.labels import Label, read_json_file
from repux.bundle.metadata import BundleMetadata
from repux.errors import InputError
from repux.network import ARCHITECTURES, build_network

MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
#: Bundles shipped inside the package, loadable by name (``load_bundle("demo")``).
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
#: dtypes ``save_bundle`` can store floating weights in.
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# safetensors dtype names -> floating (True) or not; bool and ints are integer-like.
_SAFETENSORS_FLOAT = {"F16": True, "BF16": True, "F32": True, "F64": True}


@dataclass
class Bundle:
    """A checked bundle folder: ``path`` holds ``model.json`` (``metadata``) and ``model.safetensors``."""

    path: Path
    metadata: BundleMetadata

    @property
    def labels(self) -> list[Label]:
        return self.metadata.labels

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights on the CPU, floating tensors as float32."""
        try:
            tensors = load_file(str(self.weights_path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise BundleError(f"{self.weights_path}: cannot read the weights: {error}") from None
        return {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}

    def build_network(self, device: str | torch.device = "cpu") -> nn.Module:
        """The network with the bundle's weights (loaded strictly), in eval mode, on ``device``."""
        # Built on the meta device and given the bundle's tensors: a random initialisation that
        # would be overwritten at once took half the load time at the paper's width.
        with torch.device("meta"):
            network = build_network(self.metadata.architecture, **self.metadata.network)
        network.load_state_dict(self.state_dict(), strict=True, assign=True)
        left = [name for name, tensor in itertools.chain(network.named_parameters(), network.named_buffers()) if tensor.is_meta]
        if left:  # a tensor the state_dict does not hold (none today): never hand out a network without values
            raise BundleError(f"{self.path / WEIGHTS_FILE}: no values for {', '.join(left)}")
        return network.to(device).eval()


def resolve_bundle_path(path_or_name: str | os.PathLike) -> Path:
    """A bundle folder path, or the name of a bundle shipped in the package (e.g. "demo").

    An existing path wins over a shipped name.
    """
    path = Path(path_or_name)
    if path.exists():
        return path
    shipped = SHIPPED_MODELS_DIR / str(path_or_name)
    if path.name == str(path_or_name) and shipped.exists():
        return shipped
    if str(path_or_name) == "demo":
        raise BundleError(
            f"demo: the demo model is not installed (expected the folder {shipped}); "
            "reinstall repux, or pass the path of a bundle folder"
        )
    raise BundleError(f"{path}: no such bundle folder (expected a folder with {MODEL_JSON} and {WEIGHTS_FILE})")


def load_bundle(path_or_name: str | os.PathLike) -> Bundle:
    """Read and check a bundle folder (or a shipped bundle by name, e.g. "demo").

    Raises:
        BundleError: naming the file, the key and what was expected, for malformed or
            incomplete metadata, an unknown architecture, a newer format version, label values
            that are not 0..out_chans-1, or weights that are missing, extra, mis-shaped or of
            the wrong kind.
    """
    folder = resolve_bundle_path(path_or_name)
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a folder (expected a bundle folder with {MODEL_JSON} and {WEIGHTS_FILE})")
    json_path = folder / MODEL_JSON
    metadata = BundleMetadata.from_json(read_json_file(json_path), str(json_path))
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{weights_path}: file not found (expected the bundle's weights in safetensors format)")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as weights:
            stored = {key: _stored_kind(weights.get_slice(key)) for key in weights.keys()}
    except (SafetensorError, OSError) as error:
        raise BundleError(f"{weights_path}: not a readable safetensors file: {error}") from None
    check_weights(metadata, stored, str(json_path), str(weights_path))
    return Bundle(folder, metadata)


def _stored_kind(tensor_slice) -> tuple[tuple[int, ...], bool]:
    return tuple(tensor_slice.get_shape()), _SAFETENSORS_FLOAT.get(tensor_slice.get_dtype(), False)


def check_weights(
    metadata: BundleMetadata,
    stored: Mapping[str, tuple[tuple[int, ...], bool]],
    json_source: str,
    weights_source: str,
) -> None:
    """Refuse weights that do not fit the network of ``metadata`` exactly.

    Args:
        stored: weight name -> (shape, is floating point).
        json_source, weights_source: the files to name in errors.
    """
    if metadata.architecture not in ARCHITECTURES:
        raise BundleError(
            f"{json_source}: key 'architecture': expected one of {', '.join(ARCHITECTURES)}, "
            f"got {metadata.architecture!r}"
        )
    try:
        with torch.device("meta"):
            network = build_network(metadata.architecture, **metadata.network)
    except (InputError, TypeError, ValueError) as error:
        raise BundleError(
            f"{json_source}: key 'network': not a valid {metadata.architecture} config: {error}"
        ) from None
    expected = {key: (tuple(v.shape), v.is_floating_point()) for key, v in network.state_dict().items()}
    missing = [key for key in expected if key not in stored]
    extra = [key for key in stored if key not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if extra:
            parts.append(f"unexpected {_some(extra)}")
        raise BundleError(
            f"{weights_source}: weights do not match the {metadata.architecture} network of {json_source}: "
            + "; ".join(parts)
        )
    for key, (shape, is_float) in expected.items():
        stored_shape, stored_float = stored[key]
        if stored_shape != shape:
            raise BundleError(
                f"{weights_source}: weight '{key}': expected shape {list(shape)} "
                f"(from the network in {json_source}), got {list(stored_shape)}"
            )
        if stored_float != is_float:
            kind = "a floating-point" if is_float else "an integer"
            raise BundleError(f"{weights_source}: weight '{key}': expected {kind} tensor")


def _some(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{key}'" for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def save_bundle(
    network: nn.Module | Mapping[str, torch.Tensor],
    metadata: BundleMetadata,
    out_dir: str | os.PathLike,
    force: bool = False,
    weights_dtype: str = "float32",
) -> Path:
    """Write ``network``'s weights and ``metadata`` as a bundle folder, atomically.

    Args:
        network: a network (its ``.config`` must match ``metadata``) or a state_dict for the
            network ``metadata`` describes.
        out_dir: the bundle folder to create.
        force: replace an existing bundle folder (never a folder that is not a bundle).
        weights_dtype: "float32", or "float16" to halve the file (cast back on load).

    Raises:
        FileExistsError: ``out_dir`` exists and ``force`` is False, or it is not a bundle.
        BundleError: metadata or weights that ``load_bundle`` would refuse.
    """
    out_dir = Path(out_dir)
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype={weights_dtype!r}: expected one of {', '.join(WEIGHT_DTYPES)}")
    check_output_folder(out_dir, force)
    if isinstance(network, nn.Module):
        config = dict(network.config)
        arch = config.pop("arch")
        described = {key: value for key, value in metadata.network.items() if key != "arch"}
        # Compared in JSON form, where (2, 2) and [2, 2] are the same config.
        if (arch, json_form(config)) != (metadata.architecture, json_form(described)):
            raise ValueError(
                f"metadata describes a {metadata.architecture} network with {metadata.network}, "
                f"but the network to save is a {arch} with {config}"
            )
        state_dict = network.state_dict()
    else:
        state_dict = dict(network)

    json_source = str(out_dir / MODEL_JSON)
    # Through JSON and back: the checks load_bundle makes, and normalised values in the file.
    checked = BundleMetadata.from_json(json.loads(json.dumps(metadata.to_json())), json_source)
    tensors = {key: _to_stored(key, value, WEIGHT_DTYPES[weights_dtype]) for key, value in state_dict.items()}
    stored = {key: (tuple(v.shape), v.is_floating_point()) for key, v in tensors.items()}
    check_weights(checked, stored, json_source, str(out_dir / WEIGHTS_FILE))

    with atomic_dir(out_dir, overwrite=force) as tmp:
        (tmp / MODEL_JSON).write_text(json.dumps(checked.to_json(), indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        # safetensors creates its file readable by the owner only; a bundle is meant to be shared.
        os.chmod(tmp / WEIGHTS_FILE, (tmp / MODEL_JSON).stat().st_mode & 0o777)
    return out_dir


def json_form(value: object) -> object:
    """The value as JSON reads it back, where (2, 2) and [2, 2] are the same."""
    return json.loads(json.dumps(value))


def check_output_folder(out_dir: Path, force: bool) -> None:
    """Refuse to replace ``out_dir`` unless ``force`` is given and it is a bundle folder.

    ``force`` must never delete a folder of other files given as the output by mistake.
    """
    if not out_dir.exists():
        return
    if not force:
        raise FileExistsError(f"{out_dir}: already exists; refusing to overwrite it (use --force)")
    if not out_dir.is_dir() or not (out_dir / MODEL_JSON).is_file():
        raise FileExistsError(
            f"{out_dir}: exists and is not a bundle folder (no {MODEL_JSON}); refusing to replace it even with --force"
        )


def _to_stored(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = value.detach().to("cpu").contiguous()
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        # A copy: safetensors refuses tensors that share memory, and the caller's network stays untouched.
        return tensor.clone()
    cast = tensor.to(dtype)
    if not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
        raise BundleError(f"weight '{key}': values beyond the {dtype} range; store the bundle as float32")
    return cast
