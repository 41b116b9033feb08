"""Knowledge-based SVD truncation: the r smallest singular triplets of a weight.

KaSA removes ``U_r diag(S_r) V_r^T``, the component of ``W`` spanned by its r smallest
singular values, from the effective base weight. This module computes that component.

``method="exact"`` runs a full float64 ``torch.linalg.svd``.

``method="auto"`` (the default) avoids the full SVD. With ``A`` the weight oriented tall
(M x k, M >= k; a wide weight is transposed, so both orientations cost the same):

1. Form ``G = A^T A`` (k x k) in float64 from float64 copies of row chunks of ``A``,
   computing only the upper block triangle. No float64 copy of the whole weight exists.
   A square weight with k > _DENSE_MAX_K skips G: a float64 LU factorization of A gives
   ``G^{-1} x = A^{-1} A^{-T} x`` at a third of the cost of forming and factoring G, and
   step 2 runs with that operator and no shift (see _SquareKrylov).
2. Find the eigenvectors of the smallest eigenvalues of ``G``. For k <= _DENSE_MAX_K a
   full ``eigh`` is fastest. Above, shift-and-invert block Krylov: factor
   ``G - mu I = L L^T`` (Cholesky) and run thick-restarted block Lanczos with
   ``(L L^T)^{-1}``, which turns the wanted eigenvalues into the largest ones. When the
   smallest eigenvalues are bunched far from zero (typical of tall weights), refactor once
   with ``mu`` just below them; Cholesky success proves ``mu`` is below the spectrum, so no
   wanted eigenvalue can be skipped. Tall weights start with a float32 factor, which is
   enough to locate that shift, and switch to float64 for the remaining digits.
3. Rayleigh-Ritz on ``A``: the SVD of the thin product ``A V`` gives U, S and V.
4. Check ``||A v - s u||`` and ``||A^T u - s v||`` of every triplet against
   ``tol * ||A||_F``. If the check fails, log a warning and use ``"exact"``.

Tall weights stored in float32 or less, with k > _DENSE_MAX_K, first try a cheaper
variant of steps 1-3 (see _float32_gram_triplets): form G in float32, in half the time,
run step 2 on it with float32 factors, then refine with block Davidson steps that use
float64 products with A. Each step repeats step 3 on a basis grown by the float32
factor's inverse applied to the exact residuals ``A^T A v - s^2 v``. From its first Ritz
values the solver estimates how much the float32 rounding of G costs. It hands over to
the float64 G at that first check when the cost is too high (by those estimates, from a
condition number of about 130), or when refinement does not reach tol in a few steps.

Why: the cost is the Gram product (M k^2 flops) plus one or two Cholesky factorizations
(k^3 / 3 flops), all at matrix-multiply speed, whereas an SVD spends most of its time in
memory-bound bidiagonalization. A float32 Gram matrix alone is not accurate enough: its
rounding perturbs the small eigenvalues by about 1e-7 * ||W||^2 and moves the truncated
subspace far more than a float32 SVD does, which is why the float32 variant only finds
the subspace and float64 products with A supply the digits. In float64 the truncated
weight changes by roughly 1e-16 * cond(W) * ||W||, far below the float32 SVD's error
unless cond(W) exceeds about 1e9, where the residual check rejects the result. Krylov
acceleration and the shift matter because clustered smallest singular values make plain
inverse subspace iteration take hundreds of steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

TRUNCATION_METHODS = ("auto", "exact")

ENGINE_VERSION = "3"
"""Version of the ``"auto"`` engine. Bump it when its results change, so caches built
by an older engine are not served."""

DEFAULT_TOL = 1e-8
"""Largest accepted residual of a triplet, relative to ``||W||_F``, for ``"auto"``."""

# Internal tuning. Tests monkeypatch these, for example to force the exact fallback.
_CHUNK_BYTES = 64 * 2**20  # size of one float64 row chunk of the weight for the Gram product
_PRODUCT_CHUNK_BYTES = 8 * 2**20  # the same for thin products, which are memory-bound
_GRAM_BLOCK = 256  # column block width of the triangular Gram product
_MAX_BLOCK_STEPS = 60  # Krylov block steps (each solves with `block` right-hand sides) before giving up
_MAX_BASIS_BLOCKS = 8  # the Krylov basis holds at most this many blocks before a restart
_FIRST_CHECK = 2  # block steps before the first Rayleigh-Ritz convergence check
_CHECK_EVERY = 2  # minimum block steps between checks
_MAX_CHECK_INTERVAL = 4  # maximum block steps between checks, when the observed rate predicts many
_MIN_BLOCK = 24  # smallest Krylov block; solves with fewer right-hand sides are memory-bound
_DENSE_MAX_K = 1024  # up to this k, a full eigh of the k x k Gram matrix beat Krylov (measured)
_MIN_BASIS_COLUMNS = 192  # minimum Krylov basis capacity, for small blocks
_PROBED_PAIRS = 4  # Ritz pairs whose residual is measured at every check (see _rayleigh_ritz)
_FLOAT32_START_ASPECT = 1.25  # M / k from which the Krylov solver starts with a float32 factor
_FLOAT32_MAX_STEPS = 24  # block steps after which it switches to float64
_FLOAT32_GRAM_ASPECT = 1.25  # M / k from which a float32 weight's Gram matrix is tried in float32
_FLOAT32_GRAM_MAX_FLOOR = 20.0  # largest predicted residual floor of that matrix, in multiples of tol
_FLOAT32_GRAM_MAX_SOLVE_ERROR = 2e-3  # largest estimated relative error of float32 solves with it
_FLOAT32_GRAM_TARGET = 10.0  # the float32 Krylov phase aims at this multiple of tol (see _float32_gram_triplets)
_MAX_REFINE_POWERS = 4  # Krylov powers of the correction that one refinement step adds at most
_MAX_REFINE_STEPS = 3  # Davidson steps with float64 products with W after the float32 phase
_TARGET_FACTOR = 0.2  # the iteration aims at this fraction of tol, then stops
_SEED = 20240501  # start block seed, so results are reproducible
_TINY = torch.finfo(torch.float64).tiny
_DEFLATION_TOL = 1e-13  # relative norm below which a new Krylov direction counts as dependent


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


class _NotConverged(RuntimeError):
    """Raised inside the fast engine when its result cannot be trusted."""


def validate_rank(r: int, shape: tuple[int, int], name: str = "weight", *, in_model: bool = True) -> None:
    """Raise ``ValueError`` unless ``0 < r < min(shape)``.

    ``in_model`` adds the advice to lower this module's rank with ``rank_pattern``, which
    only applies when the rank comes from a ``KasaConfig``.
    """
    k = min(shape)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r={r!r} for {name} is invalid: r must be a positive integer.")
    if r >= k:
        advice = ", or set a smaller rank for this module with rank_pattern" if in_model else ""
        raise ValueError(
            f"r={r} for {name} of shape {tuple(shape)} is too large: KaSA removes the r smallest "
            f"singular triplets, so r must be below min(out, in)={k}. Choose r <= {k - 1}{advice}."
        )


def smallest_singular_triplets(
    matrix: torch.Tensor, r: int, method: str = "auto", *, tol: float = DEFAULT_TOL
) -> Truncation:
    """Compute the r smallest singular triplets of ``matrix`` (out x in).

    The computation runs in float64 where accuracy needs it, on the matrix's device.
    The returned factors are float32, or float64 when ``matrix`` is float64.

    Args:
        matrix: a 2-D floating-point tensor, the weight in (out, in) orientation.
        r: how many triplets to return, ``0 < r < min(matrix.shape)``.
        method: ``"exact"`` for a full SVD, ``"auto"`` for the engine described in the
            module docstring, which falls back to ``"exact"`` (with a warning) when its
            residual check fails.
        tol: for ``"auto"``, the largest accepted residual ``||W v - s u||`` or
            ``||W^T u - s v||`` of any triplet, relative to ``||W||_F``.

    Raises:
        ValueError: for a bad rank, an unknown method, a non-positive ``tol``, a tensor
            that is not a 2-D real floating-point matrix, or non-finite entries.
    """
    _validate_matrix(matrix)
    if method not in TRUNCATION_METHODS:
        raise ValueError(f"truncation method {method!r} is unknown; expected one of {TRUNCATION_METHODS}.")
    validate_rank(r, (int(matrix.shape[0]), int(matrix.shape[1])), in_model=False)
    if isinstance(tol, bool) or not (isinstance(tol, float | int) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r} is invalid: expected a positive finite float such as {DEFAULT_TOL}.")
    matrix = matrix.detach()
    # A NaN or infinity makes the sum non-finite, so only then is the exact test needed (a
    # sum can also overflow). The exact test took 0.25 s for 11008 x 4096 on one CPU core.
    if not bool(torch.isfinite(matrix.sum())) and not bool(torch.isfinite(matrix).all()):
        raise ValueError(
            "the weight contains NaN or infinite values, so its singular values are undefined; "
            "check the checkpoint this model was loaded from."
        )

    out_dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    if method == "auto":
        try:
            u, s, vh = _fast_triplets(matrix, r, float(tol))
        except _NotConverged as error:
            logger.warning(
                'The "auto" truncation of a %dx%d weight (r=%d) failed its check: %s. '
                "Using the exact SVD for this weight instead.",
                matrix.shape[0],
                matrix.shape[1],
                r,
                error,
            )
            u, s, vh = _exact_triplets(matrix, r)
    else:
        u, s, vh = _exact_triplets(matrix, r)
    return Truncation(
        U=u.to(out_dtype).contiguous(),
        S=s.to(out_dtype).contiguous(),
        Vh=vh.to(out_dtype).contiguous(),
    )


def triplet_errors(matrix: torch.Tensor, result: Truncation) -> tuple[float, float]:
    """Return how far ``result`` is from being singular triplets of ``matrix``.

    The first value is the largest residual ``max(||W v_i - s_i u_i||, ||W^T u_i - s_i v_i||)``
    over the triplets, relative to ``||W||_F`` (0 for a zero matrix). It is computed over
    row chunks of W, in float64 for a float64 matrix and in float32 otherwise. Float32
    rounding added at most 2e-8 on random and all-MiniLM-L6-v2 weights. The second value
    is the largest entry of ``U^T U - I`` and ``Vh Vh^T - I``, in float64.
    """
    work = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u = result.U.to(device=matrix.device, dtype=work)
    s = result.S.to(device=matrix.device, dtype=work)
    v = result.Vh.to(device=matrix.device, dtype=work).mT
    wv = torch.empty_like(u)
    wtu = torch.zeros_like(v)
    squared_norm = 0.0
    for start, chunk in _row_chunks(matrix.detach(), _PRODUCT_CHUNK_BYTES, work):
        wv[start : start + chunk.shape[0]] = chunk @ v
        # (U^T W)^T is faster than W^T U for a narrow U in MKL (see _products).
        wtu += (u[start : start + chunk.shape[0]].mT @ chunk).mT
        squared_norm += float(chunk.norm()) ** 2
    residual = float(torch.maximum((wv - u * s).norm(dim=0), (wtu - v * s).norm(dim=0)).max())
    norm = math.sqrt(squared_norm)

    u64 = result.U.to(torch.float64)
    v64 = result.Vh.to(torch.float64).mT
    identity = torch.eye(result.rank, dtype=torch.float64, device=u64.device)
    orthogonality = max(float((u64.mT @ u64 - identity).abs().max()), float((v64.mT @ v64 - identity).abs().max()))
    return (residual / norm if norm > 0 else residual), orthogonality


def _validate_matrix(matrix: torch.Tensor) -> None:
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"expected the weight as a torch.Tensor, got {type(matrix).__name__}.")
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix (out, in), got shape {tuple(matrix.shape)}.")
    if not matrix.dtype.is_floating_point:
        raise ValueError(
            f"expected a real floating-point weight, got dtype {matrix.dtype}; "
            "convert it with .float() first."
        )


def _exact_triplets(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the r smallest triplets from a full float64 SVD (descending order)."""
    m64 = matrix.to(torch.float64)
    # torch.linalg.svd took twice as long on a float32 4096 x 11008 weight as on its
    # transpose (2-core CPU, torch 2.13), so factor the tall orientation.
    if m64.shape[0] < m64.shape[1]:
        v, s, uh = torch.linalg.svd(m64.mT, full_matrices=False)
        return uh[-r:, :].mT, s[-r:], v[:, -r:].mT
    u, s, vh = torch.linalg.svd(m64, full_matrices=False)
    return u[:, -r:], s[-r:], vh[-r:, :]


# ---------------------------------------------------------------------------------------
# The "auto" engine


def _fast_triplets(matrix: torch.Tensor, r: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the r smallest float64 triplets (U, S, Vh) of ``matrix`` or raise _NotConverged."""
    transposed = matrix.shape[0] < matrix.shape[1]
    a = matrix.mT if transposed else matrix  # (M, k) with M >= k, a view
    k = a.shape[1]

    square = a.shape[0] == k and k > _DENSE_MAX_K
    # The norm goes first: it may make a float64 copy of A, which should not coexist with
    # the float64 factor.
    fro_norm = float(torch.linalg.vector_norm(a, dtype=torch.float64)) if square else 0.0
    factorization = _square_factor(a) if square else None
    found = None
    if factorization is None and k > _DENSE_MAX_K and _float32_gram_applies(a):
        found = _float32_gram_triplets(a, r, tol)
    if found is not None:
        u, s, v, residual = found
    else:
        basis, fro_norm = _float64_basis(a, r, tol, factorization, fro_norm)
        del factorization
        if fro_norm == 0.0:
            # Every singular value is 0, so any orthonormal vectors are singular vectors.
            u = _unit_columns(a.shape[0], r, a.device)
            v = _unit_columns(k, r, a.device)
            s = torch.zeros(r, dtype=torch.float64, device=a.device)
            return (v, s, u.mT) if transposed else (u, s, v.mT)
        # Rayleigh-Ritz on A: the SVD of A V gives the best triplets within span(V). The same
        # pass over A forms A^T (A V), which the residual check needs.
        u, s, v, _, residual = _ritz_triplets(basis, *_products(a, basis), r, fro_norm)

    if not residual <= tol:
        raise _NotConverged(f"max relative residual {residual:.2e} > tol {tol:.1e} after Rayleigh-Ritz")
    logger.debug("fast truncation of %s, r=%d: max relative residual %.2e", tuple(matrix.shape), r, residual)

    if transposed:  # W = A^T, so the roles of u and v swap
        return v, s, u.mT
    return u, s, v.mT


def _float64_basis(
    a: torch.Tensor, r: int, tol: float, factorization: tuple[torch.Tensor, torch.Tensor] | None, fro_norm: float
) -> tuple[torch.Tensor, float]:
    """Return r orthonormal approximate right singular vectors of the tall ``a`` and ``||a||_F``.

    Uses the square LU solver when ``factorization`` is given (``fro_norm`` is then already
    known), and the float64 Gram matrix otherwise. A zero ``||a||_F`` comes back as 0.0
    with an arbitrary basis.
    """
    k = a.shape[1]
    block = min(k, max(r + 8, _MIN_BLOCK))
    if factorization is not None:
        solver = _SquareKrylov(a, *factorization, r, block)
        del factorization
        return solver.solve(tol * _TARGET_FACTOR * fro_norm, tol * fro_norm, fro_norm)[:, :r], fro_norm

    gram = _gram(a)
    fro_norm = float(gram.diagonal().sum().sqrt())
    if fro_norm == 0.0:
        return gram[:, :r], 0.0
    if k <= _DENSE_MAX_K:
        return _lowest_eigenvectors_dense(gram, r), fro_norm
    # Columns beyond r speed up convergence. Eight extra, or 24 in all for a small r,
    # measured fastest on 4096-wide Gaussian weights (2-core CPU, torch 2.13).
    # Tall weights usually have their smallest singular values bunched far from zero
    # (the Marchenko-Pastur soft edge of random-like matrices). Locating them for the
    # shift with a float32 factor saves one float64 Cholesky factorization.
    float32_start = a.shape[0] >= _FLOAT32_START_ASPECT * k
    # Only the first r Ritz vectors are converged to the target, so the rest are dropped.
    return _lowest_eigenvectors(gram, r, block, fro_norm, tol, float32_start)[:, :r], fro_norm


def _ritz_triplets(
    basis: torch.Tensor, av: torch.Tensor, at_av: torch.Tensor, r: int, fro_norm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Return the best r smallest triplets of A within ``span(basis)`` and their residual.

    ``av`` and ``at_av`` are ``A basis`` and ``A^T A basis`` in float64. Returns U, S
    (descending), V, the basis coefficients of V and the relative residual of
    _max_relative_residual.
    """
    ub, sb, vbh = torch.linalg.svd(av, full_matrices=False)
    coefficients = vbh[-r:, :].mT
    u = ub[:, -r:]
    s = sb[-r:]
    v = basis @ coefficients
    residual = _max_relative_residual(av @ coefficients, at_av @ coefficients, u, s, v, fro_norm)
    return u, s, v, coefficients, residual


def _float32_gram_applies(a: torch.Tensor) -> bool:
    """Return whether to try the float32 Gram matrix first for the tall ``a`` (see _float32_gram_triplets).

    Only for weights stored in less than float64, well taller than wide, and when float32
    matrix products run in IEEE float32: TF32 or bfloat16 products would make the Gram
    matrix too coarse to pay off. The float64 refinement keeps results correct either way.
    """
    if a.dtype == torch.float64 or a.shape[0] < _FLOAT32_GRAM_ASPECT * a.shape[1]:
        return False
    if torch.get_float32_matmul_precision() != "highest":
        return False
    backend = torch.backends.cuda.matmul if a.device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(backend, "fp32_precision", "none")
    return precision in ("none", "ieee") and not (a.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


def _float32_gram_triplets(
    a: torch.Tensor, r: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
    """Return U, S, V and the residual of the r smallest triplets of the tall ``a``, or None.

    Forms ``G32 = A^T A`` in float32 (half the time of float64), runs the block Krylov
    solver on it with float32 factors, then refines with float64 products with A (see
    _refine). On ill-conditioned weights the rounding of G32 makes float32 solves
    inaccurate and leaves too much for refinement, so the solver gives up as soon as its
    Ritz values show that (see _Float32GramKrylov). None means: use the float64 Gram
    matrix instead.
    """
    gram = _gram(a, torch.float32)
    fro_norm = float(gram.diagonal().sum(dtype=torch.float64).sqrt())
    if not (math.isfinite(fro_norm) and fro_norm > 0.0):
        return None
    block = min(a.shape[1], max(r + 8, _MIN_BLOCK))
    try:
        solver = _Float32GramKrylov(gram, r, block, fro_norm, tol)
        target = _FLOAT32_GRAM_TARGET * tol * fro_norm
        basis = solver.solve(target, 10.0 * target, fro_norm)
        factor = solver.factor
    except _NotConverged as error:
        logger.debug("float32 Gram matrix of %s not used: %s", tuple(a.shape), error)
        return None
    finally:
        del gram
    del solver
    try:
        return _refine(a, basis, r, factor, fro_norm, tol)
    except _NotConverged as error:
        logger.debug("float32 Gram matrix of %s not used: %s", tuple(a.shape), error)
        return None


def _refine(
    a: torch.Tensor, basis: torch.Tensor, r: int, factor: torch.Tensor, fro_norm: float, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Refine approximate singular vectors of A with float64 products; return U, S, V, residual.

    Each step is a block Davidson step: a Rayleigh-Ritz step on A over ``span(basis)``,
    then growth of the basis. With R the exact residuals ``A^T A v - s^2 v`` of the r
    wanted Ritz pairs and T the inverse of ``factor``, the new directions are
    ``T R, T^2 R, ...``, with more powers the further the residual is from tol. T comes from the float32 Gram matrix, but it only
    has to point at the errors: the Rayleigh-Ritz step and the residuals use A itself.
    The powers share one pass over A, which costs more than the solves. Stops once the
    residual is within tol; raises _NotConverged after _MAX_REFINE_STEPS steps.
    """
    av, at_av = _products(a, basis)
    for step in range(_MAX_REFINE_STEPS + 1):
        u, s, v, coefficients, residual = _ritz_triplets(basis, av, at_av, r, fro_norm)
        logger.debug("refinement step %d: basis %d, relative residual %.3e", step, basis.shape[1], residual)
        if residual <= tol:
            return u, s, v, residual
        if step == _MAX_REFINE_STEPS:
            break
        # Each power cut the residual by 2x to 10x on the measured weights, so aim at 2x.
        count = min(_MAX_REFINE_POWERS, max(1, math.ceil(math.log2(residual / tol))))
        powers = [_apply_inverse(factor, at_av @ coefficients - v * s**2)]
        for _ in range(count - 1):
            powers.append(_apply_inverse(factor, powers[-1]))
        new = _orthonormalize(torch.cat(powers, dim=1), basis)
        if new.shape[1] == 0:
            break
        a_new, at_a_new = _products(a, new)
        basis = torch.cat((basis, new), dim=1)
        av = torch.cat((av, a_new), dim=1)
        at_av = torch.cat((at_av, at_a_new), dim=1)
    raise _NotConverged(f"refinement stopped at max relative residual {residual:.2e} > tol {tol:.1e}")


def _unit_columns(rows: int, count: int, device: torch.device) -> torch.Tensor:
    """Return the last ``count`` columns of the (rows x rows) float64 identity matrix."""
    columns = torch.zeros(rows, count, dtype=torch.float64, device=device)
    columns[rows - count :, :] = torch.eye(count, dtype=torch.float64, device=device)
    return columns


def _row_chunks(a: torch.Tensor, chunk_bytes: int, dtype: torch.dtype = torch.float64):
    """Yield ``(start, a[start:stop] in dtype)`` over row chunks of about ``chunk_bytes`` in that dtype."""
    rows = max(1, chunk_bytes // (dtype.itemsize * a.shape[1]))
    for start in range(0, a.shape[0], rows):
        yield start, a[start : start + rows].to(dtype)


def _gram(a: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return ``a^T a`` in ``dtype``, computing only the upper block triangle."""
    k = a.shape[1]
    gram = torch.zeros(k, k, dtype=dtype, device=a.device)
    for _, chunk in _row_chunks(a, _CHUNK_BYTES, dtype):
        for j in range(0, k, _GRAM_BLOCK):
            gram[j : j + _GRAM_BLOCK, j:].addmm_(chunk[:, j : j + _GRAM_BLOCK].mT, chunk[:, j:])
    # Mirror the upper block triangle into the lower one, block by block to avoid a k x k temporary.
    for j in range(0, k, _GRAM_BLOCK):
        stop = j + _GRAM_BLOCK
        diagonal = gram[j:stop, j:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        gram[stop:, j:stop] = gram[j:stop, stop:].mT
    return gram


def _products(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``a @ x`` and ``a^T @ (a @ x)`` in float64, in one pass over row chunks of ``a``."""
    ax = torch.empty(a.shape[0], x.shape[1], dtype=torch.float64, device=a.device)
    at_ax = torch.zeros(a.shape[1], x.shape[1], dtype=torch.float64, device=a.device)
    for start, chunk in _row_chunks(a, _PRODUCT_CHUNK_BYTES):
        rows = ax[start : start + chunk.shape[0]]
        torch.matmul(chunk, x, out=rows)
        # (y^T A)^T is several times faster than A^T y for a narrow y in MKL (torch 2.13 CPU).
        at_ax += (rows.mT @ chunk).mT
    return ax, at_ax


def _max_relative_residual(
    av: torch.Tensor, at_av: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, fro_norm: float
) -> float:
    """Return ``max_i max(||A v_i - s_i u_i||, ||A^T u_i - s_i v_i||) / ||A||_F``, or a bound on it.

    ``av`` and ``at_av`` are ``A v`` and ``A^T A v``, computed from A itself. The SVD makes
    ``u = A v / s`` only up to rounding, so ``A^T u`` is taken as ``A^T A v / s`` and the
    difference is bounded by ``||A||_F * ||A v - s u|| / s``.
    """
    left = (av - u * s).norm(dim=0)
    safe_s = s.clamp_min(_TINY)
    right = (at_av / safe_s - v * s).norm(dim=0) + fro_norm * left / safe_s
    return float(torch.maximum(left, right).max()) / fro_norm


def _cholesky_shifted(gram: torch.Tensor, shift: float, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """Return the lower Cholesky factor of ``gram - shift * I`` in ``dtype``, or None if it is not positive definite."""
    shifted = gram.to(dtype, copy=True)
    shifted.diagonal().sub_(shift)
    # LAPACK works on column-major storage, and the transposed view of the symmetric copy is
    # column-major already, so the factorization runs in place (passing the row-major copy
    # made torch 2.13 allocate a second k x k buffer). The upper factor of the transpose is
    # the lower factor in row-major order. Its upper triangle keeps the input, which the
    # triangular solves never read.
    column_major = shifted.mT
    info = torch.empty(0, dtype=torch.int32, device=gram.device)
    _, info = torch.linalg.cholesky_ex(column_major, upper=True, out=(column_major, info))
    if int(info) != 0:
        return None
    return shifted


def _initial_factor(gram: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Factor ``gram - shift I`` in ``dtype`` with shift 0, or a small negative shift if gram is singular."""
    factor = _cholesky_shifted(gram, 0.0, dtype)
    if factor is not None:
        return factor, 0.0
    k = gram.shape[0]
    scale = float(gram.diagonal().max())
    for exponent in range(4):
        shift = -scale * k * torch.finfo(dtype).eps * 100.0**exponent
        factor = _cholesky_shifted(gram, shift, dtype)
        if factor is not None:
            logger.debug("Gram matrix is numerically singular; factored with shift %.3e", shift)
            return factor, shift
    raise _NotConverged(f"the Cholesky factorization of the Gram matrix failed even with shift {shift:.2e}")


def _apply_inverse(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``(L L^T)^{-1} x`` by two triangular solves in the factor's precision."""
    y = torch.linalg.solve_triangular(factor, x.to(factor.dtype), upper=False)
    return torch.linalg.solve_triangular(factor.mT, y, upper=True).to(x.dtype)


def _orthonormalize(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Return an orthonormal basis of the part of ``z`` orthogonal to ``basis``.

    Projects twice (classical Gram-Schmidt), drops columns that were numerically inside
    ``span(basis)``, then orthonormalizes the rest with SVQB (through the eigendecomposition
    of their small Gram matrix). The result may have fewer columns than ``z``. Tiny
    remainders are kept on their own scale: they carry the last digits of the Krylov
    information, and the Rayleigh-Ritz step is valid for any orthonormal basis.
    """
    before = z.norm(dim=0)
    for _ in range(2):
        if basis.shape[1]:
            z = z - basis @ (basis.mT @ z)
    after = z.norm(dim=0)
    keep = after > _DEFLATION_TOL * before
    z = z[:, keep] / after[keep]
    for _ in range(2):
        if z.shape[1] == 0:
            return z
        values, vectors = torch.linalg.eigh(z.mT @ z)
        kept = values > _DEFLATION_TOL * float(values.max())
        z = (z @ vectors[:, kept]) / values[kept].sqrt()
        if float(values[kept].min()) > 1e-4 * float(values.max()):
            # Well conditioned: one SVQB pass is orthonormal to rounding, and the mixing
            # kept the columns orthogonal to the basis.
            return z
        if basis.shape[1]:
            z = z - basis @ (basis.mT @ z)
    return z


def _lowest_eigenvectors_dense(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Return the eigenvectors of the r smallest eigenvalues of ``gram`` from a full eigendecomposition."""
    try:
        _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending
    except torch.linalg.LinAlgError as error:
        raise _NotConverged(f"the eigendecomposition of the Gram matrix failed: {error}") from error
    return vectors[:, :r]


def _lowest_eigenvectors(
    gram: torch.Tensor, r: int, block: int, fro_norm: float, tol: float, float32_start: bool = False
) -> torch.Tensor:
    """Return ``block`` orthonormal approximate eigenvectors for the smallest eigenvalues of ``gram``.

    The residual of a Ritz pair ``(theta, v)`` is ``||G v - theta v|| / sqrt(theta)``, which
    equals ``||A^T u - s v||`` for ``u = A v / s``, the quantity that the final check
    measures. The iteration stops when the largest residual of the first r pairs, relative
    to ``fro_norm``, is below ``tol * _TARGET_FACTOR``, or when it stops improving while
    below ``tol``: rounding errors of the float64 Gram matrix set a floor of roughly
    1e-16 * cond(A). Raises _NotConverged after _MAX_BLOCK_STEPS block steps otherwise.
    """
    solver = _ShiftInvertKrylov(gram, r, block, float32_start)
    return solver.solve(tol * _TARGET_FACTOR * fro_norm, tol * fro_norm, fro_norm)


class _ShiftInvertKrylov:
    """Thick-restarted block Krylov solver for the smallest eigenpairs of a Gram matrix G.

    The operator is ``T = (G - shift I)^{-1}``, applied through a Cholesky factor, so the
    wanted eigenvalues of G become the largest of T. ``basis`` is orthonormal, and
    ``image = T @ basis`` and ``projected = basis^T @ image`` hold up to rounding at every
    step, so a Rayleigh-Ritz step on ``projected`` is valid whatever the history of the
    basis. A restart keeps the ``block`` best Ritz vectors and continues from their
    images, whose parts orthogonal to the kept vectors are the Ritz residuals (the
    thick-restart idea of Krylov-Schur).
    """

    def __init__(self, gram: torch.Tensor, r: int, block: int, float32_start: bool) -> None:
        self.gram = gram
        self.r = r
        self.block = block
        # Factors are in the Gram matrix's precision, after an optional float32 start.
        self.precision = gram.dtype
        factor = _cholesky_shifted(gram, 0.0, torch.float32) if float32_start and gram.dtype != torch.float32 else None
        self.low_precision = factor is not None
        if factor is not None:
            self.factor, self.shift = factor, 0.0
        else:
            self.factor, self.shift = _initial_factor(gram, self.precision)
        self.shift_attempts = 0
        self._allocate_basis(gram.shape[0], gram.device)

    def _allocate_basis(self, k: int, device: torch.device) -> None:
        """Create the empty Krylov basis, its image under T and the projected matrix."""
        self.previous_lowest = math.inf
        capacity = min(k, max(_MAX_BASIS_BLOCKS * self.block, _MIN_BASIS_COLUMNS))
        self.basis = torch.empty(k, capacity, dtype=torch.float64, device=device)
        self.image = torch.empty_like(self.basis)
        self.projected = torch.empty(capacity, capacity, dtype=torch.float64, device=device)
        self.filled = 0
        self.steps = 0

    def solve(self, target: float, acceptable: float, scale: float) -> torch.Tensor:
        """Iterate until the residual is below ``target`` (see _lowest_eigenvectors)."""
        generator = torch.Generator(device=self.basis.device)
        generator.manual_seed(_SEED)
        next_block = torch.randn(
            self.basis.shape[0], self.block, generator=generator, dtype=torch.float64, device=self.basis.device
        )
        residual = previous = math.inf
        ritz_vectors = None
        next_check = _FIRST_CHECK
        last_check = 0
        while self.steps < _MAX_BLOCK_STEPS:
            added = self._expand(next_block)
            next_block = self.image[:, self.filled - added : self.filled]
            full = self.filled + self.block > self.basis.shape[1]
            if self.steps < next_check and added and not full:
                continue

            theta, coefficients, ritz_vectors, residuals = self._rayleigh_ritz(target)
            residual = float(residuals.max())
            logger.debug(
                "Krylov step %d: basis %d, shift %.3e, relative residual %.3e",
                self.steps,
                self.filled,
                self.shift,
                residual / scale,
            )
            stagnating = residual > 0.3 * previous
            previous_residual = previous
            if residual <= target or (residual <= acceptable and stagnating and not self.low_precision):
                return ritz_vectors
            # Block steps still needed at the speed observed since the last check.
            remaining = math.inf
            if previous < math.inf and residual < previous:
                per_step = math.log(previous / residual) / (self.steps - last_check)
                remaining = math.log(residual / target) / per_step
            previous, last_check = residual, self.steps
            next_check = self.steps + max(_CHECK_EVERY, round(min(0.8 * remaining, _MAX_CHECK_INTERVAL)))
            if self.shift_attempts < 2:
                next_check = self.steps + _CHECK_EVERY  # the shift decision needs recent Ritz values

            # In float32 a slow check-to-check improvement means the float32 floor is near.
            stalled = residual > 0.7 * previous_residual
            if self._shift_closer(theta, residuals, remaining) or self._leave_low_precision(stalled):
                self._restart(ritz_vectors, None, None)
                next_check = self.steps + _CHECK_EVERY
            elif full or not added:
                count = coefficients.shape[1]
                tau = 1.0 / (theta[:count] - self.shift)
                self._restart(ritz_vectors, self.image[:, : self.filled] @ coefficients, tau)
            else:
                continue
            next_block = self.image[:, : self.filled]

        if ritz_vectors is not None and residual <= acceptable:
            return ritz_vectors
        raise _NotConverged(
            f"block Krylov stopped after {self.steps} block steps at max relative residual "
            f"{residual / scale:.2e} > tol {acceptable / scale:.1e}"
        )

    def _expand(self, block: torch.Tensor) -> int:
        """Append the part of ``block`` orthogonal to the basis; return the number of new columns."""
        self.steps += 1
        old = self.filled
        q = _orthonormalize(block, self.basis[:, :old])
        width = min(q.shape[1], self.basis.shape[1] - old)
        if width:
            new = slice(old, old + width)
            self.basis[:, new] = q[:, :width]
            self.image[:, new] = self._apply(q[:, :width])
            self.filled = old + width
            # The new columns of basis^T T basis. The new rows follow by symmetry.
            columns = self.basis[:, : self.filled].mT @ self.image[:, new]
            self.projected[: self.filled, new] = columns
            self.projected[new, :old] = columns[:old].mT
            corner = columns[old:]
            self.projected[new, new] = (corner + corner.mT) / 2
        return width

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``T x``."""
        return _apply_inverse(self.factor, x)

    def _rayleigh_ritz(self, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return all Ritz values of G (ascending), basis coefficients of the first ``block``
        Ritz vectors, those vectors, and residuals of the wanted pairs.

        Multiplying by G costs about as much as a block step, so at first only the pairs
        that converge slowest are measured: the last few of the first r, which are closest
        to the unwanted part of the spectrum, and the first, which the shift needs. All r
        are measured once those are below ``target``.
        """
        tau, vectors = torch.linalg.eigh(self.projected[: self.filled, : self.filled])
        count = min(self.block, tau.shape[0])
        if count < self.r:
            raise _NotConverged(f"the Krylov space collapsed to {count} < r={self.r} directions")
        # eigh sorts tau in ascending order, and the largest tau are the smallest eigenvalues of G.
        theta = self.shift + 1.0 / tau.flip(0).clamp_min(_TINY)
        coefficients = vectors.flip(1)[:, :count]
        ritz_vectors = self.basis[:, : self.filled] @ coefficients

        probe = sorted({0, *range(max(0, self.r - _PROBED_PAIRS), self.r)})
        residuals = self._residuals(ritz_vectors[:, probe], theta[probe])
        if float(residuals.max()) <= target and len(probe) < self.r:
            residuals = self._residuals(ritz_vectors[:, : self.r], theta[: self.r])
        return theta, coefficients, ritz_vectors, residuals

    def _residuals(self, vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Return ``||G v - theta v|| / sqrt(theta)`` for each column v of ``vectors``."""
        # G is symmetric, and (X^T G)^T runs up to twice as fast as G X for narrow X in MKL.
        gram_times = (vectors.to(self.gram.dtype).mT @ self.gram).mT.to(vectors.dtype)
        gram_residual = (gram_times - vectors * values).norm(dim=0)
        return gram_residual / values.clamp_min(_TINY).sqrt()

    def _shift_closer(self, theta: torch.Tensor, residuals: torch.Tensor, remaining_steps: float) -> bool:
        """Refactor once with a shift just below the smallest Ritz value, when that pays off.

        Returns True when the operator changed (the basis images are then stale).
        """
        if self.shift_attempts >= 2:
            return False
        first_residual = float(residuals[0]) * math.sqrt(max(float(theta[0]), 0.0))
        change = abs(float(theta[0]) - self.previous_lowest)
        self.previous_lowest = float(theta[0])
        # Leaving float32 needs a float64 factorization anyway, so a shift then costs nothing
        # extra. It only has to be worth leaving float32 for.
        refactor_steps = 1.0 + self.gram.shape[0] / (6.0 * self.block)
        if self.low_precision:
            refactor_steps = 0.5 * remaining_steps
        proposals = _proposed_shifts(theta, self.r, first_residual, change, self.shift, remaining_steps, refactor_steps)
        if not proposals:
            return False
        if not self.low_precision:
            # Drop the float64 factor before making the next, so that at most two k x k
            # float64 matrices (G and one factor) exist at once. It is rebuilt if no
            # proposal works.
            self.factor = None
        for proposal in proposals[: 2 - self.shift_attempts]:
            self.shift_attempts += 1
            factor = _cholesky_shifted(self.gram, proposal, self.precision)
            if factor is not None:
                logger.debug("refactored with shift %.6e", proposal)
                self.factor, self.shift = factor, proposal
                self.shift_attempts = 2  # one successful shift is enough
                self.low_precision = False
                return True
            logger.debug("shift %.6e is not below the spectrum", proposal)
        if self.factor is None:
            self.factor = _cholesky_shifted(self.gram, self.shift, self.precision)
            if self.factor is None:
                raise _NotConverged(f"the Cholesky factorization at shift {self.shift:.3e} failed on retry")
        return False

    def _leave_low_precision(self, stalled: bool) -> bool:
        """Switch from the float32 to a float64 factor once float32 stops paying.

        That is when the residual stalls at the float32 floor, when no shift is coming
        (both attempts are used up), or after _FLOAT32_MAX_STEPS block steps. The float64
        factor keeps the current shift if it is positive definite there. Returns True when
        the operator changed.
        """
        if not self.low_precision:
            return False
        if not (stalled or self.shift_attempts >= 2 or self.steps >= _FLOAT32_MAX_STEPS):
            return False
        logger.debug("leaving the float32 factor after %d block steps", self.steps)
        self.factor = None  # release it before the float64 factorization
        factor = _cholesky_shifted(self.gram, self.shift) if self.shift > 0 else None
        if factor is None:
            factor, self.shift = _initial_factor(self.gram)
        self.factor = factor
        self.low_precision = False
        return True

    def _restart(self, ritz_vectors: torch.Tensor, ritz_image: torch.Tensor | None, tau: torch.Tensor | None) -> None:
        """Replace the basis by the Ritz vectors.

        ``ritz_image`` and ``tau`` (their T-Ritz values) are None after a shift change,
        and are then recomputed with the new operator.
        """
        width = ritz_vectors.shape[1]
        self.basis[:, :width] = ritz_vectors
        if ritz_image is None or tau is None:
            self.steps += 1
            ritz_image = self._apply(ritz_vectors)
            projected = ritz_vectors.mT @ ritz_image
            self.projected[:width, :width] = (projected + projected.mT) / 2
        else:
            self.projected[:width, :width] = torch.diag(tau)
        self.image[:, :width] = ritz_image
        self.filled = width


class _Float32GramKrylov(_ShiftInvertKrylov):
    """The block Krylov solver on a float32 Gram matrix, with float32 factors throughout.

    At every check it estimates, from the smallest Ritz value theta_1 (about sigma_min^2),
    whether the float32 route can pay off, and raises _NotConverged when it cannot:

    * ``eps32 lambda_max / theta_1``, the relative error of float32 solves with G, must
      stay below _FLOAT32_GRAM_MAX_SOLVE_ERROR, or the iteration itself stalls;
    * ``eps32 ||A||_F / (k sqrt(theta_1))`` estimates the residual floor that the
      rounding of G leaves. It must stay below _FLOAT32_GRAM_MAX_FLOOR * tol, or
      refinement needs too many steps. The rounding of a float32 Gram matrix is largest
      on its diagonal, whose mean is ``||A||_F^2 / k``, hence the formula.

    The limits come from 11008 x 4096 and 1536 x 512 weights with log-decaying spectra.
    Up to a solve error of 1.1e-3 (condition number 100), refinement reached tol in one or
    two steps. At 9.7e-3 (condition number 300) the float32 iteration stalled at 230 tol.
    """

    def __init__(self, gram: torch.Tensor, r: int, block: int, fro_norm: float, tol: float) -> None:
        super().__init__(gram, r, block, float32_start=False)
        self.largest = _largest_eigenvalue(gram)
        self.fro_norm = fro_norm
        self.tol = tol

    def _rayleigh_ritz(self, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        result = super()._rayleigh_ritz(target)
        lowest = float(result[0][0])
        eps = torch.finfo(torch.float32).eps
        solve_error = eps * self.largest / lowest if lowest > 0.0 else math.inf
        floor = eps * self.fro_norm / (self.gram.shape[0] * math.sqrt(lowest)) if lowest > 0.0 else math.inf
        logger.debug("float32 Gram check: solve error %.1e, predicted floor %.1f tol", solve_error, floor / self.tol)
        if solve_error > _FLOAT32_GRAM_MAX_SOLVE_ERROR:
            raise _NotConverged(f"float32 solves with it lose too many digits (relative error {solve_error:.1e})")
        if floor > _FLOAT32_GRAM_MAX_FLOOR * self.tol:
            raise _NotConverged(
                f"its rounding leaves a predicted residual floor of {floor:.1e} > {_FLOAT32_GRAM_MAX_FLOOR:g} tol"
            )
        return result


def _largest_eigenvalue(gram: torch.Tensor, steps: int = 4) -> float:
    """Return a lower estimate of the largest eigenvalue of the symmetric ``gram`` (block power iteration)."""
    generator = torch.Generator(device=gram.device)
    generator.manual_seed(_SEED)
    x = torch.randn(gram.shape[0], 4, generator=generator, dtype=gram.dtype, device=gram.device)
    for _ in range(steps):
        x = gram @ x
        x = x / x.norm(dim=0).clamp_min(torch.finfo(gram.dtype).tiny)
    return float((x * (gram @ x)).sum(dim=0).max())


def _proposed_shifts(
    theta: torch.Tensor,
    r: int,
    first_residual: float,
    lowest_change: float,
    shift: float,
    remaining_steps: float,
    refactor_steps: float,
) -> list[float]:
    """Return shifts just below the smallest eigenvalue of G that pay off, closest first.

    The block Krylov error for the r-th eigenvalue shrinks per block step by about
    ``exp(-2 sqrt(g))`` with ``g = (lambda_{block+1} - lambda_r) / (lambda_r - mu)``, so
    moving the shift mu from ``shift`` to a proposal multiplies the speed by
    ``sqrt((lambda_r - shift) / (lambda_r - proposal))``. Ritz values stand in for the
    eigenvalues, and ``remaining_steps`` is the estimate at the current speed. A shift is
    proposed when the steps it saves exceed ``refactor_steps``, the cost of one more
    Cholesky factorization in block steps.

    The safe proposal stays ``2 * first_residual`` below the smallest Ritz value (a
    distance that provably contains an eigenvalue) and at least a quarter of the wanted
    Ritz values' spread below it, which keeps the wanted eigenvalues of T within a factor
    of 5. When the smallest Ritz value moved less than that quarter since the last check
    (``lowest_change``), a closer proposal without the residual margin comes first:
    extreme Ritz values converge fast, so it usually lies below the spectrum already, and
    the Cholesky factorization tells.
    """
    lowest = float(theta[0])
    spread = float(theta[max(r, 2) - 1]) - lowest
    wanted = float(theta[r - 1])
    candidates = [lowest - max(0.25 * spread, 2.0 * first_residual)]
    if lowest_change <= 0.25 * spread:
        candidates.insert(0, lowest - 0.25 * spread)
    proposals = []
    for proposal in candidates:
        if not proposal > shift or proposal in proposals:
            continue
        speedup = math.sqrt((wanted - shift) / (wanted - proposal))
        if remaining_steps * (1.0 - 1.0 / speedup) > refactor_steps:
            proposals.append(proposal)
    return proposals


class _SquareKrylov(_ShiftInvertKrylov):
    """The block Krylov solver for a square weight A, without the Gram matrix.

    ``(A^T A)^{-1} x`` is ``A^{-1} (A^{-T} x)``, so a float64 LU factorization (of A^T,
    which serves solves with A and A^T alike; see _square_factor) replaces forming G (k^3 flops) and factoring it (k^3 / 3 flops) with k^3 * 2/3 flops,
    and products with G become two thin products with A. There is no shift: square
    weights have their smallest singular values spread down towards zero, where a shift
    gains little, and an LU factor of A cannot be shifted in G's terms.
    """

    def __init__(self, a: torch.Tensor, lu: torch.Tensor, pivots: torch.Tensor, r: int, block: int) -> None:
        self.a = a
        self.lu = lu
        self.pivots = pivots
        self.r = r
        self.block = block
        self.factor = None
        self.shift = 0.0
        self.low_precision = False
        self.shift_attempts = 2  # no shifts: _shift_closer returns at once
        self._allocate_basis(a.shape[1], a.device)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        # self.lu factors A^T, so the plain solve applies A^{-T} and the adjoint one A^{-1}.
        y = torch.linalg.lu_solve(self.lu, self.pivots, x)
        return torch.linalg.lu_solve(self.lu, self.pivots, y, adjoint=True)

    def _residuals(self, vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        gram_times = _products(self.a, vectors)[1]
        return (gram_times - vectors * values).norm(dim=0) / values.clamp_min(_TINY).sqrt()


def _square_factor(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the float64 LU factorization of the transpose of the square ``a``, or None if singular.

    The row-major float64 copy of A is A^T in column-major order, which LAPACK factors in
    place, so the factor needs no second k x k buffer. Solves with A and A^T then swap:
    ``A^{-1} x`` is the adjoint solve with this factor (see _SquareKrylov._apply).
    """
    copy = a.to(torch.float64, copy=True)
    pivots = torch.empty(0, dtype=torch.int32, device=a.device)
    info = torch.empty(0, dtype=torch.int32, device=a.device)
    lu, pivots, info = torch.linalg.lu_factor_ex(copy.mT, out=(copy.mT, pivots, info))
    if int(info) != 0:
        return None
    diagonal = lu.diagonal().abs()
    # A pivot ratio this small signals cond(A) of about 1e13 or more, where float64 solves
    # lose the digits the residual check needs. The Gram solver shifts such matrices instead.
    if not bool(torch.isfinite(diagonal).all()) or float(diagonal.min()) <= 1e-13 * float(diagonal.max()):
        return None
    return lu, pivots
