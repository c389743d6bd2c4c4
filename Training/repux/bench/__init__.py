"""The speed and memory benchmark: the published way of segmenting against the project's.

- :mod:`.paths`: :class:`SegmentationPath`, the :data:`REFERENCE` and :data:`OPTIMIZED`
  ways of running a bundle, and :func:`build_segmenter`.
- :mod:`.worker`: one measurement in a fresh process (its wall time and peak memory alone).
- :mod:`.agreement`: per-label Dice between label maps, largest probability difference.
- :mod:`.suite`: the whole benchmark (``repux bench``, ``benchmarks/segment_speed.py``).
- :mod:`.report`: the Markdown results.
"""
