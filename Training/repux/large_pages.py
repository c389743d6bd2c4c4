"""Transparent huge pages for PyTorch's CPU tensors, switched on before torch starts.

Every sliding window allocates its activations afresh (over a gigabyte per 96^3 window at
the paper's width), and with 4 kB pages the kernel zero-fills them one fault at a time.
PyTorch backs tensors of 2 MB and more by huge pages when ``THP_MEM_ALLOC_ENABLE=1``: 512
times fewer faults. It reads the variable once, at its first allocation, so it must be in
the environment before that: :func:`enable_large_pages` runs first thing in ``repux``, and
benchmark workers get :data:`LARGE_PAGES_ENV`.
"""

from __future__ import annotations

import os

__all__ = ["LARGE_PAGES_ENV", "SMALL_PAGES_ENV", "enable_large_pages"]

LARGE_PAGES_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
#: PyTorch's default, stated explicitly (a child would otherwise inherit ``repux``'s choice).
SMALL_PAGES_ENV = {"THP_MEM_ALLOC_ENABLE": "0"}


def enable_large_pages() -> None:
    """Ask for large pages unless the user's environment already says otherwise."""
    for name, value in LARGE_PAGES_ENV.items():
        os.environ.setdefault(name, value)
