"""GUI-free parts of the RepUXSegment module; they need MRML (the ``slicer-core`` wheel) and no Qt.

- logic: :class:`RepUXLogic`, the scripting API (segment, export, add a case, retrain,
  segment for review, re-segment a box, rank cases).
- runner: ``repux`` jobs in a separate process with progress and Cancel.
- catalog: the models to choose from and their cards.
- segmentations: label maps to segments (names, colours, terminology) and back.
- review: confidence overlay, review rows, next uncertain region, ROI boxes, rankings.
- trainingset: the curated cases for ``repux train``.
- volumes: volume nodes to and from files.
- dependencies: which Python packages the jobs need are missing (read from metadata only).
"""
