"""Knowledge-based SVD truncation: the r smallest singular triplets of a weight.

KaSA removes ``U_r diag(S_r) V_r^T``, the component of ``W`` spanned by its r smallest
singular values, from the effective base weight. This module computes that component.

``method="exact"`` runs a full float64 ``torch.linalg.svd``.

``method="auto"`` (the default) avoids the full SVD. With ``A`` the weight oriented tall
(M x k, M >= k; a wide weight is transposed, so both orientations cost the same):

1. Form ``G = A^T A`` (k x k) in float64 from float64 copies of row chunks of ``A``,
   computing only the upper block triangle. No float64 copy of the whole weight exists.
   A square weight with k > _DENSE_MAX_K skips G: a float64 LU factorization of A gives
   ``G^{-1} x = A^{-1} A^{-T} x`` at half the cost of forming and factoring G, and
   step 2 runs with that operator and no shift (see _krylov.SquareKrylov).
2. Find the eigenvectors of the smallest eigenvalues of ``G``. For k <= _DENSE_MAX_K a
   full ``eigh`` is fastest. Above, shift-and-invert block Krylov: factor
   ``G - mu I = L L^T`` (Cholesky) and run thick-restarted block Lanczos with
   ``(L L^T)^{-1}``, which turns the wanted eigenvalues into the largest ones. When the
   smallest eigenvalues are bunched far from zero (typical of tall weights), refactor once
   with ``mu`` just below them; Cholesky success proves ``mu`` is below the spectrum, so no
   wanted eigenvalue can be skipped. On this float64 G, tall weights start the solver
   with a float32 Cholesky factor of G, which is enough to locate that shift, and switch
   to a float64 factor for the remaining digits.
3. Rayleigh-Ritz on ``A``: the SVD of the thin product ``A V`` gives U, S and V.
4. Check ``||A v - s u||`` and ``||A^T u - s v||`` of every triplet against
   ``tol * ||A||_F``. If the check fails, log a warning and use ``"exact"``.

Tall weights stored in float32 or less, with k > _DENSE_MAX_K, first try a cheaper
variant of steps 1-3 (see _float32_gram_triplets): form G in float32, in half the time,
run step 2 on it with float32 factors, then refine with block Davidson steps that use
float64 products with A. Each step repeats step 3 on a basis grown by the float32
factor's inverse applied to the exact residuals ``A^T A v - s^2 v``. At every check the
solver estimates from its Ritz values how much the float32 rounding of G costs. It hands
over to the float64 G when that cost is too high, which the first check usually shows
(by those estimates, from a condition number of about 130). It also hands over when its
float32 phase stalls above a loose limit or runs out of block steps, and when
refinement does not reach tol in a few steps.

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

from . import _chunked, _krylov
from ._krylov import NotConverged

logger = logging.getLogger(__name__)

TRUNCATION_METHODS = ("auto", "exact")

ENGINE_VERSION = "3"
"""Version of the ``"auto"`` engine. Bump it when its results change, so caches built
by an older engine are not served."""

DEFAULT_TOL = 1e-8
"""Largest accepted residual of a triplet, relative to ``||W||_F``, for ``"auto"``."""

# Internal tuning. Tests monkeypatch these, for example to force the exact fallback. The
# eigensolvers' own settings are in _krylov, and the chunk sizes of products in _chunked.
_MIN_BLOCK = 24  # smallest Krylov block; solves with fewer right-hand sides are memory-bound
_DENSE_MAX_K = 1024  # up to this k, a full eigh of the k x k Gram matrix beat Krylov (measured)
_FLOAT32_START_ASPECT = 1.25  # M / k from which the Krylov solver starts with a float32 factor
_FLOAT32_GRAM_ASPECT = 1.25  # M / k from which a float32 weight's Gram matrix is tried in float32
_FLOAT32_GRAM_MAX_FLOOR = 20.0  # largest predicted residual floor of that matrix, in multiples of tol
_FLOAT32_GRAM_MAX_SOLVE_ERROR = 2e-3  # largest estimated relative error of float32 solves with it
_FLOAT32_GRAM_TARGET = 10.0  # the float32 Krylov phase aims at this multiple of tol (see _float32_gram_triplets)
_FLOAT32_GRAM_LIMIT = 1000.0  # and hands a stalled result to refinement when below this multiple
_FLOAT32_GRAM_MAX_STEPS = 30  # block steps of the float32 Krylov phase before it gives up
_MAX_REFINE_POWERS = 4  # Krylov powers of the correction that one refinement step adds at most
_MAX_REFINE_STEPS = 3  # Davidson steps with float64 products with W after the float32 phase
_TARGET_FACTOR = 0.2  # the iteration aims at this fraction of tol, then stops
_TINY = torch.finfo(torch.float64).tiny


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


def validate_rank(r: int, shape: tuple[int, int], name: str = "weight", *, in_model: bool = True) -> None:
    """Raise ``ValueError`` unless ``0 < r < min(shape)``.

    ``in_model`` adds advice that only applies when the rank comes from a ``KasaConfig``:
    lowering this module's rank with ``rank_pattern``, or leaving the module out.
    """
    k = min(shape)
    if not isinstance(r, int) or isinstance(r, bool):
        raise ValueError(f"r={r!r} for {name} is invalid: expected a Python int, got {type(r).__name__}; pass int(r).")
    if r <= 0:
        raise ValueError(f"r={r!r} for {name} is invalid: r must be a positive integer.")
    if k < 2:
        advice = " Leave this module out of the targets." if in_model else ""
        raise ValueError(
            f"{name} of shape {tuple(shape)} cannot be truncated: min(out, in)={k} leaves no rank r "
            f"with 0 < r < min(out, in).{advice}"
        )
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
        except NotConverged as error:
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
    for start, chunk in _chunked.row_chunks(matrix.detach(), _chunked.PRODUCT_CHUNK_BYTES, work):
        wv[start : start + chunk.shape[0]] = chunk @ v
        # (U^T W)^T is faster than W^T U for a narrow U in MKL (see _chunked.products).
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
    """Return the r smallest float64 triplets (U, S, Vh) of ``matrix`` or raise NotConverged."""
    transposed = matrix.shape[0] < matrix.shape[1]
    a = matrix.mT if transposed else matrix  # (M, k) with M >= k, a view
    k = a.shape[1]

    square = a.shape[0] == k and k > _DENSE_MAX_K
    # The norm goes first: it may make a float64 copy of A, which should not coexist with
    # the float64 factor.
    fro_norm = float(torch.linalg.vector_norm(a, dtype=torch.float64)) if square else 0.0
    factorization = _krylov.square_factor(a) if square else None
    label = f"{matrix.shape[0]}x{matrix.shape[1]}"
    found = None
    tried_float32 = factorization is None and k > _DENSE_MAX_K and _float32_gram_applies(a)
    if tried_float32:
        found = _float32_gram_triplets(a, r, tol, label)
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
        u, s, v, _, residual = _ritz_triplets(basis, *_chunked.products(a, basis), r, fro_norm)

    if not residual <= tol:
        raise NotConverged(f"max relative residual {residual:.2e} > tol {tol:.1e} after Rayleigh-Ritz")
    if found is not None:
        path = "float32 Gram matrix, float64 refinement"
    else:
        path = "float64 after float32" if tried_float32 else "float64"
    logger.debug("fast truncation of the %s weight, r=%d (%s): max relative residual %.2e", label, r, path, residual)

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
    block = _krylov_block(k, r)
    if factorization is not None:
        solver = _krylov.SquareKrylov(a, *factorization, r, block)
        del factorization
        return solver.solve(tol * _TARGET_FACTOR * fro_norm, tol * fro_norm, fro_norm)[:, :r], fro_norm

    gram = _chunked.gram(a)
    fro_norm = float(gram.diagonal().sum().sqrt())
    if fro_norm == 0.0:
        return gram[:, :r], 0.0
    if k <= _DENSE_MAX_K:
        return _lowest_eigenvectors_dense(gram, r), fro_norm
    # Tall weights usually have their smallest singular values bunched far from zero
    # (the Marchenko-Pastur soft edge of random-like matrices). Locating them for the
    # shift with a float32 factor saves one float64 Cholesky factorization.
    float32_start = a.shape[0] >= _FLOAT32_START_ASPECT * k
    # Only the first r Ritz vectors are converged to the target, so the rest are dropped.
    return _lowest_eigenvectors(gram, r, block, fro_norm, tol, float32_start)[:, :r], fro_norm


def _krylov_block(k: int, r: int) -> int:
    """Return the block width of the Krylov solvers for rank r on a k-wide Gram matrix.

    Columns beyond r speed up convergence. Eight extra, or 24 in all for a small r,
    measured fastest on 4096-wide Gaussian weights (2-core CPU, torch 2.13).
    """
    return min(k, max(r + 8, _MIN_BLOCK))


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
    a: torch.Tensor, r: int, tol: float, label: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
    """Return U, S, V and the residual of the r smallest triplets of the tall ``a``, or None.

    ``label`` names the weight in log messages.

    Forms ``G32 = A^T A`` in float32 (half the time of float64), runs the block Krylov
    solver on it with float32 factors, then refines with float64 products with A (see
    _refine). On ill-conditioned weights the rounding of G32 makes float32 solves
    inaccurate and leaves too much for refinement, so the solver gives up as soon as its
    Ritz values show that (see _krylov.Float32GramKrylov). None means: use the float64 Gram
    matrix instead.
    """
    gram = _chunked.gram(a, torch.float32)
    fro_norm = float(gram.diagonal().sum(dtype=torch.float64).sqrt())
    if not (math.isfinite(fro_norm) and fro_norm > 0.0):
        return None
    block = _krylov_block(a.shape[1], r)
    try:
        solver = _krylov.Float32GramKrylov(
            gram,
            r,
            block,
            fro_norm,
            tol,
            max_solve_error=_FLOAT32_GRAM_MAX_SOLVE_ERROR,
            max_floor=_FLOAT32_GRAM_MAX_FLOOR,
            max_steps=_FLOAT32_GRAM_MAX_STEPS,
        )
        basis = solver.solve(_FLOAT32_GRAM_TARGET * tol * fro_norm, _FLOAT32_GRAM_LIMIT * tol * fro_norm, fro_norm)
    except NotConverged as error:
        logger.debug("float32 Gram matrix of the %s weight not used, using float64 instead: %s", label, error)
        return None
    factor = solver.factor
    del solver, gram  # only the float32 factor is needed from here on
    try:
        return _refine(a, basis, r, factor, fro_norm, tol)
    except NotConverged as error:
        logger.debug("float32 Gram matrix of the %s weight not used, using float64 instead: %s", label, error)
        return None


def _refine(
    a: torch.Tensor, basis: torch.Tensor, r: int, factor: torch.Tensor, fro_norm: float, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Refine approximate singular vectors of A with float64 products; return U, S, V, residual.

    Each step is a block Davidson step: a Rayleigh-Ritz step on A over ``span(basis)``,
    then growth of the basis. With R the exact residuals ``A^T A v - s^2 v`` of the r
    wanted Ritz pairs and T the inverse of ``factor``, the new directions are
    ``T R, T^2 R, ...``, with more powers the further the residual is from tol. T comes
    from the float32 Gram matrix, but it only has to point at the errors: the
    Rayleigh-Ritz step and the residuals use A itself.
    The powers share one pass over A, which costs more than the solves. Stops once the
    residual is within tol; raises NotConverged after _MAX_REFINE_STEPS steps.
    """
    av, at_av = _chunked.products(a, basis)
    for step in range(_MAX_REFINE_STEPS + 1):
        u, s, v, coefficients, residual = _ritz_triplets(basis, av, at_av, r, fro_norm)
        logger.debug("refinement step %d: basis %d, relative residual %.3e", step, basis.shape[1], residual)
        if residual <= tol:
            return u, s, v, residual
        if step == _MAX_REFINE_STEPS:
            break
        # Each power cut the residual by 2x to 10x on the measured weights, so aim at 2x.
        count = min(_MAX_REFINE_POWERS, max(1, math.ceil(math.log2(residual / tol))))
        powers = [_krylov.apply_inverse(factor, at_av @ coefficients - v * s**2)]
        for _ in range(count - 1):
            powers.append(_krylov.apply_inverse(factor, powers[-1]))
        new = _krylov.orthonormalize(torch.cat(powers, dim=1), basis)
        if new.shape[1] == 0:
            break
        a_new, at_a_new = _chunked.products(a, new)
        basis = torch.cat((basis, new), dim=1)
        av = torch.cat((av, a_new), dim=1)
        at_av = torch.cat((at_av, at_a_new), dim=1)
    raise NotConverged(f"refinement stopped at max relative residual {residual:.2e} > tol {tol:.1e}")


def _unit_columns(rows: int, count: int, device: torch.device) -> torch.Tensor:
    """Return the last ``count`` columns of the (rows x rows) float64 identity matrix."""
    columns = torch.zeros(rows, count, dtype=torch.float64, device=device)
    columns[rows - count :, :] = torch.eye(count, dtype=torch.float64, device=device)
    return columns


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


def _lowest_eigenvectors_dense(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Return the eigenvectors of the r smallest eigenvalues of ``gram`` from a full eigendecomposition."""
    try:
        _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending
    except torch.linalg.LinAlgError as error:
        raise NotConverged(f"the eigendecomposition of the Gram matrix failed: {error}") from error
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
    1e-16 * cond(A). Raises NotConverged after _krylov.MAX_BLOCK_STEPS block steps otherwise.
    """
    solver = _krylov.ShiftInvertKrylov(gram, r, block, float32_start)
    return solver.solve(tol * _TARGET_FACTOR * fro_norm, tol * fro_norm, fro_norm)


