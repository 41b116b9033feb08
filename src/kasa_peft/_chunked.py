"""Products with a weight over row chunks, so that no float64 copy of the whole weight exists.

Internal to the truncation engine (see kasa_peft.truncation).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_BYTES = 64 * 2**20  # size of one row chunk of the weight, in the product's dtype, for the Gram product
PRODUCT_CHUNK_BYTES = 8 * 2**20  # the same for thin products, which are memory-bound
GRAM_BLOCK = 256  # column block width of the triangular Gram product


def row_chunks(
    a: torch.Tensor, chunk_bytes: int, dtype: torch.dtype = torch.float64
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, a[start:stop] in dtype)`` over row chunks of about ``chunk_bytes`` in that dtype."""
    rows = max(1, chunk_bytes // (dtype.itemsize * a.shape[1]))
    for start in range(0, a.shape[0], rows):
        yield start, a[start : start + rows].to(dtype)


def gram(a: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return ``a^T a`` in ``dtype``, computing only the upper block triangle."""
    k = a.shape[1]
    result = torch.zeros(k, k, dtype=dtype, device=a.device)
    for _, chunk in row_chunks(a, CHUNK_BYTES, dtype):
        for j in range(0, k, GRAM_BLOCK):
            result[j : j + GRAM_BLOCK, j:].addmm_(chunk[:, j : j + GRAM_BLOCK].mT, chunk[:, j:])
    # Mirror the upper block triangle into the lower one, block by block to avoid a k x k temporary.
    for j in range(0, k, GRAM_BLOCK):
        stop = j + GRAM_BLOCK
        diagonal = result[j:stop, j:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        result[stop:, j:stop] = result[j:stop, stop:].mT
    return result


def products(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``a @ x`` and ``a^T @ (a @ x)`` in float64, in one pass over row chunks of ``a``."""
    ax = torch.empty(a.shape[0], x.shape[1], dtype=torch.float64, device=a.device)
    at_ax = torch.zeros(a.shape[1], x.shape[1], dtype=torch.float64, device=a.device)
    for start, chunk in row_chunks(a, PRODUCT_CHUNK_BYTES):
        rows = ax[start : start + chunk.shape[0]]
        torch.matmul(chunk, x, out=rows)
        # (y^T A)^T is several times faster than A^T y for a narrow y in MKL (torch 2.13 CPU).
        at_ax += (rows.mT @ chunk).mT
    return ax, at_ax

