"""Knowledge-based SVD truncation: the r smallest singular triplets of a weight.

KaSA removes ``U_r diag(S_r) V_r^T``, the component of ``W`` spanned by its r smallest
singular values, from the effective base weight. This module computes that component.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

TRUNCATION_METHODS = ("auto", "exact")


@dataclass(frozen=True)
class Truncation:
    """The r smallest singular triplets of a matrix W (out x in).

    ``W_trunc = W - U @ diag(S) @ Vh``. Singular values are in descending order, like
    ``torch.linalg.svd``, so ``S[-1]`` is the smallest singular value of W.
    """

    U: torch.Tensor  # (out, r), orthonormal columns
    S: torch.Tensor  # (r,)
    Vh: torch.Tensor  # (r, in), orthonormal rows

    @property
    def rank(self) -> int:
        """Number of removed singular triplets."""
        return int(self.S.shape[0])

    def component(self) -> torch.Tensor:
        """Return the removed component ``U diag(S) Vh`` as a dense (out, in) matrix."""
        return (self.U * self.S) @ self.Vh


def validate_rank(r: int, shape: tuple[int, int], name: str = "weight") -> None:
    """Raise ``ValueError`` unless ``0 < r < min(shape)``."""
    k = min(shape)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r={r!r} for {name} is invalid: r must be a positive integer.")
    if r >= k:
        raise ValueError(
            f"r={r} for {name} of shape {tuple(shape)} is too large: KaSA removes the r smallest "
            f"singular triplets, so r must be below min(out, in)={k}. Choose r <= {k - 1}, or set a "
            "smaller rank for this module with rank_pattern."
        )


def smallest_singular_triplets(matrix: torch.Tensor, r: int, method: str = "auto") -> Truncation:
    """Compute the r smallest singular triplets of ``matrix`` (out x in).

    The computation runs in float64 for inputs of any precision, on the matrix's device.
    The returned factors are float32, or float64 when ``matrix`` is float64.

    Args:
        matrix: a 2-D floating-point tensor, the weight in (out, in) orientation.
        r: how many triplets to return, ``0 < r < min(matrix.shape)``.
        method: ``"exact"`` for a full SVD, ``"auto"`` for the default engine.

    Raises:
        ValueError: for a bad rank, an unknown method, or non-finite entries.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(matrix.shape)}.")
    validate_rank(r, tuple(matrix.shape))
    if method not in TRUNCATION_METHODS:
        raise ValueError(f"truncation method {method!r} is unknown; expected one of {TRUNCATION_METHODS}.")
    if not torch.isfinite(matrix).all():
        raise ValueError(
            "the weight contains NaN or infinite values, so its singular values are undefined; "
            "check the checkpoint this model was loaded from."
        )

    out_dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    return Truncation(
        U=u[:, -r:].to(out_dtype).contiguous(),
        S=s[-r:].to(out_dtype).contiguous(),
        Vh=vh[-r:, :].to(out_dtype).contiguous(),
    )
