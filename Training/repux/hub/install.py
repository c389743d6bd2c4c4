"""Installing a published model: download (or a file the user brought), check, import, remove, verify.

Every file goes through the same steps, whether it was downloaded now or by hand on another
computer: refused if it is a web page; its size and SHA-256 compared with the registry's
where the registry has them; then the weights-only import of ``repux import-checkpoint``
(never code from a file), whose network must be the registry's; the bundle is written
atomically into the models folder under the model's name, with the file's SHA-256 and the
source URL in its provenance. A refused download is deleted (the next attempt starts over);
a cut or stalled one stays as ``<models>/.downloads/NAME.part`` and is resumed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from repux.bundle.checkpoint import file_sha256, import_checkpoint
from repux.bundle.errors import BundleError
from repux.bundle.metadata import default_preprocessing
from repux.bundle.presets import label_preset
from repux.bundle.store import MODEL_JSON, SHIPPED_MODELS_DIR, load_bundle
from repux.hub.download import DownloadError, WebPageError, browser_advice, download, refuse_web_page
from repux.hub.folders import partial_download_path
from repux.hub.registry import PublishedModel
from repux.progress import Progress

#: Provenance key naming the registry entry a bundle was installed from.
REGISTRY_KEY = "registry_model"


def check_importable(model: PublishedModel) -> None:
    if not model.importable:
        raise BundleError(
            f"model {model.name}: listed for reference only: {model.not_importable_reason}; source: {model.url}"
        )


def pull(
    model: PublishedModel,
    folder: Path,
    progress: Progress,
    timeout: float,
    force: bool = False,
    labels: str | None = None,
    how: str | None = None,
) -> Path:
    """Download ``model`` once and install it as ``folder/NAME``; return the bundle folder.

    An installed model is not downloaded again unless ``force``. ``labels``: a label preset
    instead of the registry's (e.g. "flare21" when ``repux models check`` says so).
    """
    check_importable(model)
    target = folder / model.name
    if target.exists() and not force:
        progress.message(
            f"{model.name} is already installed in {target} (repux models remove {model.name} to re-download)"
        )
        return target
    part = partial_download_path(folder, model.name)
    try:
        download(model, part, progress, timeout)
    except WebPageError:
        part.unlink(missing_ok=True)  # nothing of the checkpoint to resume
        raise
    try:
        how = how or f"repux models pull {model.name}"
        bundle = install_file(model, part, folder, progress, how=how, force=force, labels=labels, downloaded=True)
    except (BundleError, DownloadError):
        part.unlink(missing_ok=True)  # complete but unusable: the next attempt must fetch it anew
        raise
    part.unlink(missing_ok=True)
    return bundle


def check_file(model: PublishedModel, path: Path, what: str) -> str:
    """Refuse a web page, or a size or SHA-256 other than the registry's; return the SHA-256."""
    refuse_web_page(path, model, what)
    size = path.stat().st_size
    if model.size_bytes is not None and size != model.size_bytes:
        raise DownloadError(
            f"model {model.name}: {what} has {size} bytes, expected {model.size_bytes} (the registry's size); "
            "not the published file, or an incomplete one. " + browser_advice(model)
        )
    digest = file_sha256(path)
    if model.sha256 is not None and digest != model.sha256:
        raise DownloadError(
            f"model {model.name}: {what} has SHA-256 {digest}, expected {model.sha256} (the registry's); "
            "refusing a file that is not the published one. " + browser_advice(model)
        )
    return digest


def install_file(
    model: PublishedModel,
    path: Path,
    folder: Path,
    progress: Progress,
    how: str,
    force: bool = False,
    labels: str | None = None,
    downloaded: bool = False,
) -> Path:
    """Check the checkpoint file ``path`` and import it as ``folder/NAME`` (atomically).

    ``labels``: a label preset instead of the registry's; ``how``: the command, for provenance.
    """
    check_importable(model)
    path = Path(path)
    what = f"the downloaded file {path}" if downloaded else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the checkpoint of model {model.name})")
    progress.stage(f"check {model.name}")
    digest = check_file(model, path, what)
    progress.stage(f"import {model.name}")
    preprocessing = default_preprocessing(
        tuple(model.preprocessing["spacing"]), tuple(model.preprocessing["patch_size"])
    )
    preprocessing["intensity"] = dict(model.preprocessing["intensity"])
    preprocessing["orientation"] = model.preprocessing["orientation"]
    try:
        return import_checkpoint(
            path,
            model.architecture,
            label_preset(labels or model.labels),
            folder / model.name,
            spacing=preprocessing["spacing"],
            name=model.name,
            description=f"{model.title}. {model.label_note}".strip(),
            command=how,
            force=force,
            expected_network=model.weights_network,
            preprocessing=preprocessing,
            inference={"overlap": model.preprocessing["overlap"], "sw_batch_size": 4, "blend": "constant"},
            provenance={
                "source": model.url,
                "source_sha256": digest,
                REGISTRY_KEY: model.name,
                "label_preset": labels or model.labels,
                "citation": model.citation,
            },
        )
    except BundleError as error:
        raise BundleError(f"model {model.name}: {error}") from None


def remove(name: str, folder: Path) -> Path:
    """Delete the installed bundle ``folder/name`` (and its partial download); return its path.

    Only a bundle folder in the models folder is removed, never a shipped model.
    """
    target = folder / name
    part = partial_download_path(folder, name)
    if (SHIPPED_MODELS_DIR / name).exists() and not target.exists():
        raise BundleError(f"model {name}: is shipped with repux and cannot be removed")
    if not (target / MODEL_JSON).is_file():
        if part.exists():
            part.unlink()
            return part
        raise BundleError(f"model {name}: not installed (no bundle folder {target})")
    # Renamed away first, so no half-deleted bundle is ever visible under the model's name.
    trash = folder / f".{name}.removing-{uuid.uuid4().hex[:8]}"
    os.replace(target, trash)
    shutil.rmtree(trash)
    part.unlink(missing_ok=True)
    return target


def verify(name: str, folder: Path, model: PublishedModel | None) -> list[str]:
    """Check the installed bundle ``name`` fully; return what was checked, one line each.

    Raises:
        BundleError: the bundle is broken, or differs from its registry entry.
    """
    target = folder / name
    if not target.exists() and (SHIPPED_MODELS_DIR / name).exists():
        target = SHIPPED_MODELS_DIR / name
    if not target.exists():
        raise BundleError(f"model {name}: not installed (no bundle folder {target})")
    bundle = load_bundle(target)
    bundle.state_dict()  # reads every tensor: a truncated or corrupted weights file fails here
    done = [
        f"{target}: model.json and the weights of every layer of the {bundle.metadata.architecture} network are complete"
    ]
    provenance = bundle.metadata.provenance
    if model is not None and provenance.get(REGISTRY_KEY) == model.name:
        expected = model.weights_network
        network = {key: bundle.metadata.network.get(key) for key in expected}
        if network != expected:
            raise BundleError(f"model {name}: the bundle's network {network} is not the registry's {expected}")
        done.append(f"network as in the registry entry {model.name}")
        if model.sha256 is not None:
            if provenance.get("source_sha256") != model.sha256:
                raise BundleError(
                    f"model {name}: made from a file with SHA-256 {provenance.get('source_sha256')}, "
                    f"expected {model.sha256} (the registry's)"
                )
            done.append(f"made from the published file (SHA-256 {model.sha256})")
        else:
            done.append(
                f"source file SHA-256 {provenance.get('source_sha256')} (the registry publishes none to compare)"
            )
    return done
