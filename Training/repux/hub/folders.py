"""Where models live on this computer: one folder shared by the ``repux`` command and Slicer.

``$REPUX_MODELS_DIR``, else the folder a caller passes (the Slicer module passes its
setting), else ``~/.repux/models``. Each installed model is one bundle folder in it, named
after the model. Unfinished downloads wait in its ``.downloads`` subfolder as ``NAME.part``
files (resumed by the next ``repux models pull NAME``), and exports for other runtimes in
its ``.exports`` subfolder; folders starting with a dot are never models. Torch-free: the Slicer GUI process imports this.
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR_ENV = "REPUX_MODELS_DIR"
DEFAULT_USER_MODELS_DIR = Path("~/.repux/models")
#: ``repux train -o BUNDLE`` keeps its checkpoints in ``BUNDLE.work`` (for --resume): not a model.
WORK_SUFFIX = ".work"
#: Subfolder of the models folder that holds partial downloads.
DOWNLOADS_SUBDIR = ".downloads"
#: Subfolder of the models folder that keeps models exported for another CPU runtime
#: (``repux segment --backend openvino``), one folder per weights and window; safe to delete.
EXPORTS_SUBDIR = ".exports"


def models_dir(chosen: str | os.PathLike | None = None) -> Path:
    """The models folder: ``$REPUX_MODELS_DIR``, else ``chosen``, else ``~/.repux/models`` (absolute)."""
    folder = os.environ.get(MODELS_DIR_ENV) or chosen or DEFAULT_USER_MODELS_DIR
    return Path(folder).expanduser().resolve()


def partial_download_path(folder: Path, name: str) -> Path:
    """Where the unfinished download of model ``name`` is kept between attempts."""
    return folder / DOWNLOADS_SUBDIR / f"{name}.part"
