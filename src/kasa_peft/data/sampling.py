"""Reproducible random subsets for ``max_train_samples`` and ``max_eval_samples``."""

from __future__ import annotations

import random


def sample_indices(num_rows: int, max_samples: int | None, seed: int) -> list[int]:
    """Return the row indices to keep when at most ``max_samples`` rows are wanted.

    With ``max_samples`` None or at least ``num_rows``, every index is returned in file
    order. Otherwise a uniformly random subset of ``max_samples`` distinct indices is
    drawn with a partial Fisher-Yates shuffle driven by ``random.Random(seed).random()``,
    whose output sequence Python keeps stable across versions, and the subset is
    returned sorted in file order. The same ``(num_rows, seed)`` gives the same subset,
    and a larger ``max_samples`` with the same seed gives a superset of a smaller one.

    Raises ``ValueError`` if ``max_samples`` is not a positive integer.
    """
    if max_samples is None:
        return list(range(num_rows))
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples={max_samples!r} is invalid: expected a positive integer, or None for all rows")
    if max_samples >= num_rows:
        return list(range(num_rows))

    generator = random.Random(seed)
    indices = list(range(num_rows))
    for position in range(max_samples):
        # Swap a uniformly chosen index from the not-yet-chosen tail into `position`.
        offset = int(generator.random() * (num_rows - position))
        chosen = position + offset
        indices[position], indices[chosen] = indices[chosen], indices[position]
    return sorted(indices[:max_samples])
