"""Fingerprints that tell whether a base weight is the one an adapter was made for.

Two kinds are stored per weight:

- a checksum of the weight's bytes (integer sums, exact and independent of summation
  order), compared when the model stores the weight in the dtype it was saved from. It
  reads the weight once at memory speed, so reloading stays cheap on large models.
- a fingerprint: the Frobenius norm and four random bilinear projections ``l_i^T W r_i``
  with fixed-seed Gaussian vectors, in float64. Unlike the checksum it survives a change
  of storage dtype (an adapter made on float32 weights loads onto the same model in
  bfloat16), while any change beyond rounding moves the projections by about the change's
  Frobenius norm.
"""

from __future__ import annotations

import math

import torch

FINGERPRINT_SEED = 20241209
_PROJECTIONS = 4
_ROW_CHUNK = 1024

# Unit roundoff of each storage dtype: rounding a weight changes each projection by a
# random amount with standard deviation of about 0.6 * u * ||W||_F.
_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def weight_fingerprint(matrix: torch.Tensor) -> torch.Tensor:
    """Return the float64 CPU fingerprint (5,) of a weight in (out, in) orientation.

    Rows are converted to float64 in chunks, so the extra memory is a small fraction of
    the weight.
    """
    out_features, in_features = matrix.shape
    generator = torch.Generator().manual_seed(FINGERPRINT_SEED)
    left = torch.randn(out_features, _PROJECTIONS, generator=generator, dtype=torch.float64)
    right = torch.randn(in_features, _PROJECTIONS, generator=generator, dtype=torch.float64)
    left = left.to(matrix.device)
    right = right.to(matrix.device)
    projections = torch.zeros(_PROJECTIONS, dtype=torch.float64, device=matrix.device)
    squared_norm = torch.zeros((), dtype=torch.float64, device=matrix.device)
    with torch.no_grad():
        for start in range(0, out_features, _ROW_CHUNK):
            rows = matrix[start : start + _ROW_CHUNK].to(torch.float64)
            projections += ((rows @ right) * left[start : start + _ROW_CHUNK]).sum(dim=0)
            squared_norm += (rows * rows).sum()
    return torch.cat([squared_norm.sqrt().reshape(1), projections]).cpu()


_INTEGER_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weight_checksum(weight: torch.Tensor) -> torch.Tensor:
    """Return an exact int64 CPU checksum (2,) of a 2-D weight's bytes, in its stored layout.

    The first entry sums the bytes read as 64-bit words. The sum wraps on overflow, so it
    does not depend on summation order. The second entry weights each row's sum by the
    row's position, so it changes when rows move or the matrix is transposed.
    """
    weight = weight.detach().contiguous()
    rows = weight.reshape(weight.shape[0], -1)
    row_bytes = rows.shape[1] * rows.element_size()
    if row_bytes % 8 == 0:
        words = rows.view(torch.uint8).view(torch.int64)
    else:
        words = rows.view(_INTEGER_VIEW[rows.element_size()]).to(torch.int64)
    row_sums = words.sum(dim=1)
    positions = torch.arange(1, rows.shape[0] + 1, dtype=torch.int64, device=rows.device)
    return torch.stack([row_sums.sum(), (row_sums * positions).sum()]).cpu()


def fingerprint_tolerance(saved_dtype: torch.dtype, current_dtype: torch.dtype) -> float:
    """Return the relative tolerance for fingerprints of weights stored in these dtypes.

    The same dtype means the same bytes, so only float64 summation order can differ
    (1e-9). Across dtypes it is 6 unit roundoffs of the coarser one, about 10 standard
    deviations of the rounding noise.
    """
    if saved_dtype == current_dtype:
        return 1e-9
    roundoff = max(_UNIT_ROUNDOFF.get(dtype, 2.0**-8) for dtype in (saved_dtype, current_dtype))
    return 6 * roundoff


def fingerprint_mismatch(saved: torch.Tensor, current: torch.Tensor, tolerance: float) -> float | None:
    """Return the relative difference of two fingerprints if it exceeds ``tolerance``, else None.

    A non-finite difference (a NaN or infinite weight) is always a mismatch.
    """
    scale = max(float(saved[0]), float(current[0]), 1e-30)
    difference = float((saved.to(torch.float64) - current.to(torch.float64)).abs().max()) / scale
    return difference if not math.isfinite(difference) or difference > tolerance else None
