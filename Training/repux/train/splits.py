"""Dividing curated cases into training and validation sets: a held-out fraction or k folds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from repux.errors import InputError


def split_cases(
    cases: Sequence[Any],
    val_fraction: float = 0.2,
    folds: int | None = None,
    fold: int | None = None,
    seed: int = 0,
) -> tuple[list[Any], list[Any]]:
    """Split ``cases`` into (training, validation) reproducibly.

    The cases (anything with a ``case_id``) are ordered by id and shuffled with ``seed``, so the split does not
    depend on the order a folder lists them in. With ``folds`` the shuffled list is dealt
    into ``folds`` groups round-robin and group ``fold`` validates; otherwise the first
    ``round(val_fraction * n)`` (at least 1 when ``val_fraction > 0``) validate.

    Raises:
        InputError: too few cases for the requested split.
    """
    n = len(cases)
    order = sorted(range(n), key=lambda i: cases[i].case_id)
    order = [order[i] for i in np.random.default_rng(seed).permutation(n)]
    if folds is not None:
        if n < folds:
            raise InputError(f"--folds {folds} needs at least {folds} cases; the data has {n}")
        val_positions = set(range(fold, n, folds))
    elif val_fraction > 0:
        if n < 2:
            raise InputError(f"a validation split needs at least 2 cases; the data has {n} (use --val-fraction 0)")
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        val_positions = set(range(n_val))
    else:
        val_positions = set()
    train = [cases[i] for p, i in enumerate(order) if p not in val_positions]
    val = [cases[i] for p, i in enumerate(order) if p in val_positions]
    if not train:
        raise InputError(f"no cases left for training out of {n}")
    return train, val
