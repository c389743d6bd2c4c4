"""``repux serve``: segmentation as an HTTP service, and its client.

- :mod:`.tokens`: the access-token file (creation, constant-time check, add, revoke).
- :mod:`.jobs`: job folders, the queue, one worker per device running ``repux segment``.
- :mod:`.app`: the FastAPI application (``/health``, ``/v1/...``).
- :mod:`.client`: a standard-library client (Slicer, ``repux segment --server``).

Importing this package imports nothing heavy; the server parts need the ``server`` extra.
"""
