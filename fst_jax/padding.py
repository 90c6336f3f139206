"""Length buckets and padding: the one layout shared by the sampler's prompts and the train batch.

Prompt rows are left-padded to a bucket (so the last prompt token sits at the same column in
every row and a new context text of similar length reuses the compiled programs); completions
are right-padded. ``Sampler.encode`` and ``build_train_batch`` both call these, so a prompt has
the same columns and positions when it is sampled and when it is trained on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


def bucket(n: int, buckets: Sequence[int] | None = None, minimum: int = 16) -> int:
    """The smallest of ``buckets`` >= ``n`` (default: powers of two >= ``minimum``);
    ValueError if ``n`` exceeds the largest bucket."""
    if buckets is None:
        b = minimum
        while b < n:
            b *= 2
        return b
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, *, left: bool,
             num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [R, length], mask bool [R, length])`` with each row's ids flush right
    (``left=True``: padding on the left) or flush left; ``R = num_rows`` (default ``len(rows)``),
    extra rows all padding. ValueError if a row is longer than ``length``."""
    R = len(rows) if num_rows is None else num_rows
    tokens = np.full((R, length), pad_id, np.int32)
    mask = np.zeros((R, length), bool)
    for i, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than the padded length {length}")
        cols = slice(length - n, length) if left else slice(0, n)
        tokens[i, cols] = row
        mask[i, cols] = True
    return tokens, mask
