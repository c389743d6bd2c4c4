"""Published models: the registry, downloads, installing into the shared models folder, label checks.

- folders: the models folder (``$REPUX_MODELS_DIR``, ``~/.repux/models``) and partial downloads.
- registry: ``registry.json`` of the published RepUX-Net / 3D UX-Net checkpoints.
- download: plain HTTP(S) with resume and timeouts; Google Drive through gdown.
- install: check and import a file as a bundle (weights-only), remove, verify (needs torch).
- listing: the table of ``repux models list``.
- label_check: label order against abdominal anatomy (``repux models check``).

folders, registry, download and listing are torch-free (the Slicer GUI process uses them).
"""
