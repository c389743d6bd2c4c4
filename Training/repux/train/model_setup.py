"""Where training starts: a bundle to fine-tune (with a new output head if the labels differ) or a fresh network."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repux.bundle import Label, label_preset, labels_from_json, load_bundle
from repux.bundle.metadata import default_inference, default_preprocessing
from repux.errors import InputError
from repux.network import NETWORK_PRESETS, build_network
from repux.train.config import SCRATCH_DEFAULTS


@dataclass
class StartingPoint:
    """The network to train and the bundle metadata it carries forward.

    Attributes:
        network: the network, in train mode, on the CPU.
        architecture: key of ``repux.network.ARCHITECTURES``.
        labels: output labels (value = output channel, 0 = background).
        preprocessing, inference: ``model.json`` sections for the trained bundle.
        source: where the weights came from, for the provenance ("bundle PATH" or "network small").
        head_mapping: for a new output head, each label name -> the source label name whose
            output row it starts from (None: a fresh row); empty when the head was kept.
        from_scratch: True for a freshly initialised network.
    """

    network: nn.Module
    architecture: str
    labels: list[Label]
    preprocessing: dict[str, Any]
    inference: dict[str, Any]
    source: str
    head_mapping: dict[str, str | None] = field(default_factory=dict)
    from_scratch: bool = False


def resolve_labels(spec: str) -> list[Label]:
    """A label preset name ("flare", "flare21", "amos") or the path of a labels JSON file."""
    path = Path(spec)
    if path.suffix.lower() == ".json" or path.exists():
        return labels_from_json(path)
    return label_preset(spec)


def network_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A network config with "arch": a ``NETWORK_PRESETS`` name, a JSON file of one, or a dict.

    Raises:
        InputError: an unknown preset name or an unreadable file.
    """
    if isinstance(spec, dict):
        config = dict(spec)
    elif spec in NETWORK_PRESETS:
        config = dict(NETWORK_PRESETS[spec])
    elif spec.lower().endswith(".json"):
        try:
            config = json.loads(Path(spec).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"--network {spec}: no such file (expected a preset name or a network config JSON)") from None
        except (OSError, ValueError) as error:
            raise InputError(f"--network {spec}: cannot read it as JSON ({error})") from None
        if not isinstance(config, dict):
            raise InputError(f"--network {spec}: expected a JSON object of network arguments with 'arch'")
    else:
        raise InputError(
            f"--network {spec!r}: expected one of {', '.join(NETWORK_PRESETS)} or a network config .json file"
        )
    config.setdefault("arch", "repuxnet")
    return config


def _normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


#: State-dict prefix of the output block (a 1x1x1 conv), as in the published checkpoints.
HEAD_PREFIX = "out."


def map_output_head(
    source_state: dict[str, torch.Tensor],
    source_labels: list[Label],
    target: nn.Module,
    target_labels: list[Label],
) -> dict[str, str | None]:
    """Load ``source_state`` into ``target``, whose output head has other labels.

    Every weight outside the output block is copied as it is. The output block's weight and
    bias are copied row by row (one row per output channel): the row of each target label
    comes from the source label of the same name (case, spaces and underscores ignored);
    labels without a match keep ``target``'s fresh initialisation.

    Returns:
        Each target label name -> the source label name it was mapped from, or None.

    Raises:
        InputError: weights that differ in any other way (the bundle has another network).
    """
    source_by_name = {_normalised(label.name): label for label in source_labels}
    matches = {label.name: source_by_name.get(_normalised(label.name)) for label in target_labels}
    for key, value in target.state_dict().items():
        old = source_state.get(key)
        if old is None:
            raise InputError(f"the starting bundle has no weight {key!r}; cannot fine-tune this network from it")
        if key.startswith(HEAD_PREFIX) and old.shape[1:] == value.shape[1:]:
            for label in target_labels:
                matched = matches[label.name]
                if matched is not None:
                    value[label.value] = old[matched.value]
        elif old.shape == value.shape:
            value.copy_(old)
        else:
            raise InputError(
                f"the starting bundle's weight {key!r} has shape {list(old.shape)}, expected {list(value.shape)}; "
                "only the output head may differ when fine-tuning"
            )
    return {name: (label.name if label is not None else None) for name, label in matches.items()}


def _same_labels(a: list[Label], b: list[Label]) -> bool:
    return [(label.value, _normalised(label.name)) for label in a] == [(label.value, _normalised(label.name)) for label in b]


def start_from_bundle(model: str, labels: list[Label] | None = None) -> StartingPoint:
    """Fine-tune the bundle ``model`` (path or shipped name), with a new head for other ``labels``."""
    bundle = load_bundle(model)
    meta = bundle.metadata
    labels = list(meta.labels) if labels is None else labels
    if _same_labels(labels, meta.labels):
        network = bundle.build_network("cpu")
        mapping: dict[str, str | None] = {}
    else:
        config = dict(meta.network, out_chans=len(labels))
        network = build_network(meta.architecture, **config)
        with torch.no_grad():
            mapping = map_output_head(bundle.state_dict(), meta.labels, network, labels)
    return StartingPoint(
        network=network.train(),
        architecture=meta.architecture,
        labels=labels,
        preprocessing=json.loads(json.dumps(meta.preprocessing)),
        inference=dict(meta.inference),
        source=f"bundle {bundle.path}",
        head_mapping=mapping,
    )


def start_from_scratch(
    network: str | dict[str, Any], labels: list[Label], seed: int = 0, alpha: float | None = None
) -> StartingPoint:
    """A fresh network of a preset (or config), initialised from ``seed``, for ``labels``.

    Preprocessing: the paper's CT window with the spacing and patch of
    :data:`~repux.train.config.SCRATCH_DEFAULTS`. ``alpha`` (the frequency prior's) is
    recorded in a RepUX-Net's config as ``a``.
    """
    config = network_config(network)
    arch = config.pop("arch")
    config["out_chans"] = len(labels)
    config.setdefault("in_chans", 1)
    if alpha is not None and arch == "repuxnet":
        config["a"] = float(alpha)
    torch.manual_seed(seed)
    net = build_network(arch, **config)
    name = network if isinstance(network, str) else "custom"
    # A preset's own spacing and patch; a custom network gets the CPU-sized ones.
    defaults = SCRATCH_DEFAULTS.get(name, SCRATCH_DEFAULTS["small"])
    return StartingPoint(
        network=net.train(),
        architecture=arch,
        labels=labels,
        preprocessing=default_preprocessing(defaults["spacing"], defaults["patch_size"]),
        inference=default_inference(),
        source=f"network {name}",
        from_scratch=True,
    )
