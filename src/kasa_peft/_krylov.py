"""Shift-and-invert block Krylov eigensolvers of the truncation engine, and their factorizations.

They find the eigenvectors of the smallest eigenvalues of a Gram matrix ``G = A^T A``
through a Cholesky factor of ``G - shift I`` (ShiftInvertKrylov, Float32GramKrylov), or
through an LU factor of a square A (SquareKrylov). Internal to the truncation engine:
see kasa_peft.truncation for the method and its checks.
"""

from __future__ import annotations

import logging
import math

import torch

from . import _chunked

# The solvers log under the engine's name, so one logger configuration covers the engine.
logger = logging.getLogger("kasa_peft.truncation")

# Tuning, measured on a 2-core CPU with torch 2.13. Tests monkeypatch some of these.
MAX_BLOCK_STEPS = 60  # Krylov block steps (each solves with `block` right-hand sides) before giving up
MAX_BASIS_BLOCKS = 8  # the Krylov basis holds at most this many blocks before a restart
FIRST_CHECK = 2  # block steps before the first Rayleigh-Ritz convergence check
CHECK_EVERY = 2  # minimum block steps between checks
MAX_CHECK_INTERVAL = 4  # maximum block steps between checks, when the observed rate predicts many
MIN_BASIS_COLUMNS = 192  # minimum Krylov basis capacity, for small blocks
PROBED_PAIRS = 4  # Ritz pairs whose residual is measured at every check (see _rayleigh_ritz)
FLOAT32_MAX_STEPS = 24  # block steps after which it switches to float64
SEED = 20240501  # start block seed, so results are reproducible
DEFLATION_TOL = 1e-13  # relative norm below which a new Krylov direction counts as dependent
TINY = torch.finfo(torch.float64).tiny


class NotConverged(RuntimeError):
    """Raised inside the fast engine when its result cannot be trusted."""


def cholesky_shifted(gram: torch.Tensor, shift: float, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
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
    factor = cholesky_shifted(gram, 0.0, dtype)
    if factor is not None:
        return factor, 0.0
    k = gram.shape[0]
    scale = float(gram.diagonal().max())
    for exponent in range(4):
        shift = -scale * k * torch.finfo(dtype).eps * 100.0**exponent
        factor = cholesky_shifted(gram, shift, dtype)
        if factor is not None:
            logger.debug("Gram matrix is numerically singular; factored with shift %.3e", shift)
            return factor, shift
    raise NotConverged(f"the Cholesky factorization of the Gram matrix failed even with shift {shift:.2e}")


def apply_inverse(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``(L L^T)^{-1} x`` by two triangular solves in the factor's precision."""
    y = torch.linalg.solve_triangular(factor, x.to(factor.dtype), upper=False)
    return torch.linalg.solve_triangular(factor.mT, y, upper=True).to(x.dtype)


def orthonormalize(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
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
    keep = after > DEFLATION_TOL * before
    z = z[:, keep] / after[keep]
    for _ in range(2):
        if z.shape[1] == 0:
            return z
        values, vectors = torch.linalg.eigh(z.mT @ z)
        kept = values > DEFLATION_TOL * float(values.max())
        z = (z @ vectors[:, kept]) / values[kept].sqrt()
        if float(values[kept].min()) > 1e-4 * float(values.max()):
            # Well conditioned: one SVQB pass is orthonormal to rounding, and the mixing
            # kept the columns orthogonal to the basis.
            return z
        if basis.shape[1]:
            z = z - basis @ (basis.mT @ z)
    return z


class ShiftInvertKrylov:
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
        factor = cholesky_shifted(gram, 0.0, torch.float32) if float32_start and gram.dtype != torch.float32 else None
        self.low_precision = factor is not None
        if factor is not None:
            self.factor, self.shift = factor, 0.0
        else:
            self.factor, self.shift = _initial_factor(gram, self.precision)
        self.shift_attempts = 0
        self._allocate_basis(gram.shape[0], gram.device)

    # What the ``acceptable`` level of solve() is called in its error message.
    acceptable_name = "tol"

    @property
    def max_steps(self) -> int:
        """Return the block steps that solve() may take before giving up."""
        return MAX_BLOCK_STEPS

    def _allocate_basis(self, k: int, device: torch.device) -> None:
        """Create the empty Krylov basis, its image under T and the projected matrix."""
        self.previous_lowest = math.inf
        capacity = min(k, max(MAX_BASIS_BLOCKS * self.block, MIN_BASIS_COLUMNS))
        self.basis = torch.empty(k, capacity, dtype=torch.float64, device=device)
        self.image = torch.empty_like(self.basis)
        self.projected = torch.empty(capacity, capacity, dtype=torch.float64, device=device)
        self.filled = 0
        self.steps = 0

    def solve(self, target: float, acceptable: float, scale: float) -> torch.Tensor:
        """Iterate until the residual is below ``target``, or below ``acceptable`` once it stops improving.

        Residuals are relative to ``scale`` only in log messages. Raises NotConverged
        when neither happens within ``max_steps`` block steps (MAX_BLOCK_STEPS unless a
        subclass sets fewer).
        """
        generator = torch.Generator(device=self.basis.device)
        generator.manual_seed(SEED)
        next_block = torch.randn(
            self.basis.shape[0], self.block, generator=generator, dtype=torch.float64, device=self.basis.device
        )
        residual = previous = math.inf
        ritz_vectors = None
        next_check = FIRST_CHECK
        last_check = 0
        while self.steps < self.max_steps:
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
            next_check = self.steps + max(CHECK_EVERY, round(min(0.8 * remaining, MAX_CHECK_INTERVAL)))
            if self.shift_attempts < 2:
                next_check = self.steps + CHECK_EVERY  # the shift decision needs recent Ritz values

            # In float32 a slow check-to-check improvement means the float32 floor is near.
            stalled = residual > 0.7 * previous_residual
            if self._shift_closer(theta, residuals, remaining) or self._leave_low_precision(stalled):
                self._restart(ritz_vectors, None, None)
                next_check = self.steps + CHECK_EVERY
            elif full or not added:
                count = coefficients.shape[1]
                tau = 1.0 / (theta[:count] - self.shift)
                self._restart(ritz_vectors, self.image[:, : self.filled] @ coefficients, tau)
            else:
                continue
            next_block = self.image[:, : self.filled]

        if ritz_vectors is not None and residual <= acceptable:
            return ritz_vectors
        raise NotConverged(
            f"block Krylov stopped after {self.steps} block steps at max relative residual "
            f"{residual / scale:.2e} > {self.acceptable_name} {acceptable / scale:.1e}"
        )

    def _expand(self, block: torch.Tensor) -> int:
        """Append the part of ``block`` orthogonal to the basis; return the number of new columns."""
        self.steps += 1
        old = self.filled
        q = orthonormalize(block, self.basis[:, :old])
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
        return apply_inverse(self.factor, x)

    def _rayleigh_ritz(self, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return all Ritz values of G (ascending), basis coefficients of the first ``block``
        Ritz vectors, those vectors, and residuals of the wanted pairs.

        Multiplying by G costs about as much as a block step, so at first only the pairs
        that converge slowest are measured. Those are the last few of the first r, which
        are closest to the unwanted part of the spectrum, and the first, which the shift
        needs. All r are measured once those are below ``target``.
        """
        tau, vectors = torch.linalg.eigh(self.projected[: self.filled, : self.filled])
        count = min(self.block, tau.shape[0])
        if count < self.r:
            raise NotConverged(f"the Krylov space collapsed to {count} < r={self.r} directions")
        # eigh sorts tau in ascending order, and the largest tau are the smallest eigenvalues of G.
        theta = self.shift + 1.0 / tau.flip(0).clamp_min(TINY)
        coefficients = vectors.flip(1)[:, :count]
        ritz_vectors = self.basis[:, : self.filled] @ coefficients

        probe = sorted({0, *range(max(0, self.r - PROBED_PAIRS), self.r)})
        residuals = self._residuals(ritz_vectors[:, probe], theta[probe])
        if float(residuals.max()) <= target and len(probe) < self.r:
            residuals = self._residuals(ritz_vectors[:, : self.r], theta[: self.r])
        return theta, coefficients, ritz_vectors, residuals

    def _residuals(self, vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Return ``||G v - theta v|| / sqrt(theta)`` for each column v of ``vectors``."""
        # G is symmetric, and (X^T G)^T runs up to twice as fast as G X for narrow X in MKL.
        gram_times = (vectors.to(self.gram.dtype).mT @ self.gram).mT.to(vectors.dtype)
        gram_residual = (gram_times - vectors * values).norm(dim=0)
        return gram_residual / values.clamp_min(TINY).sqrt()

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
            # Drop the current factor (in G's precision) before making the next, so that
            # at most two k x k matrices (G and one factor) exist at once. It is rebuilt
            # if no proposal works.
            self.factor = None
        for proposal in proposals[: 2 - self.shift_attempts]:
            self.shift_attempts += 1
            factor = cholesky_shifted(self.gram, proposal, self.precision)
            if factor is not None:
                logger.debug("refactored with shift %.6e", proposal)
                self.factor, self.shift = factor, proposal
                self.shift_attempts = 2  # one successful shift is enough
                self.low_precision = False
                return True
            logger.debug("shift %.6e is not below the spectrum", proposal)
        if self.factor is None:
            self.factor = cholesky_shifted(self.gram, self.shift, self.precision)
            if self.factor is None:
                raise NotConverged(f"the Cholesky factorization at shift {self.shift:.3e} failed on retry")
        return False

    def _leave_low_precision(self, stalled: bool) -> bool:
        """Switch from the float32 to a float64 factor once float32 stops paying.

        That is when the residual stalls at the float32 floor, when no shift is coming
        (both attempts are used up), or after FLOAT32_MAX_STEPS block steps. The float64
        factor keeps the current shift if it is positive definite there. Returns True when
        the operator changed.
        """
        if not self.low_precision:
            return False
        if not (stalled or self.shift_attempts >= 2 or self.steps >= FLOAT32_MAX_STEPS):
            return False
        logger.debug("leaving the float32 factor after %d block steps", self.steps)
        self.factor = None  # release it before the float64 factorization
        factor = cholesky_shifted(self.gram, self.shift) if self.shift > 0 else None
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


class Float32GramKrylov(ShiftInvertKrylov):
    """The block Krylov solver on a float32 Gram matrix, with float32 factors throughout.

    At every check it estimates, from the smallest Ritz value theta_1 (about sigma_min^2),
    whether the float32 route can pay off, and raises NotConverged when it cannot:

    * ``eps32 lambda_max / theta_1``, the relative error of float32 solves with G, must
      stay below ``max_solve_error``, or the iteration itself stalls;
    * ``eps32 ||A||_F / (k sqrt(theta_1))`` estimates the residual floor that the
      rounding of G leaves. It must stay below ``max_floor * tol``, or
      refinement needs too many steps. The rounding of a float32 Gram matrix is largest
      on its diagonal, whose mean is ``||A||_F^2 / k``, hence the formula.

    The limits come from 11008 x 4096 and 1536 x 512 weights with log-decaying spectra.
    Up to a solve error of 1.1e-3 (condition number 100), refinement reached tol in one or
    two steps. At 9.7e-3 (condition number 300) the float32 iteration stalled at 230 tol.
    """

    def __init__(
        self,
        gram: torch.Tensor,
        r: int,
        block: int,
        fro_norm: float,
        tol: float,
        *,
        max_solve_error: float,
        max_floor: float,
        max_steps: int,
    ) -> None:
        # The factors follow the Gram matrix's dtype (see ShiftInvertKrylov.precision), so
        # they are float32 throughout. low_precision stays False: it marks the float32
        # start on a float64 Gram matrix, which this solver never leaves.
        super().__init__(gram, r, block, float32_start=False)
        self.largest = largest_eigenvalue(gram)
        self.fro_norm = fro_norm
        self.tol = tol
        self.max_solve_error = max_solve_error
        self.max_floor = max_floor
        self.step_limit = max_steps

    acceptable_name = "the float32 phase's limit"

    @property
    def max_steps(self) -> int:
        """Return the block steps that solve() may take before giving up."""
        return min(MAX_BLOCK_STEPS, self.step_limit)

    def _rayleigh_ritz(self, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        result = super()._rayleigh_ritz(target)
        lowest = float(result[0][0])
        eps = torch.finfo(torch.float32).eps
        if lowest > 0.0:
            solve_error = eps * self.largest / lowest
            floor = eps * self.fro_norm / (self.gram.shape[0] * math.sqrt(lowest))
        else:
            solve_error = floor = math.inf
        logger.debug(
            "float32 Gram check: solve error %.2e (limit %.1e), predicted floor %.1f x tol (limit %g x tol)",
            solve_error,
            self.max_solve_error,
            floor / self.tol,
            self.max_floor,
        )
        if solve_error > self.max_solve_error:
            raise NotConverged(
                f"float32 solves with it lose too many digits "
                f"(relative error {solve_error:.2e} > limit {self.max_solve_error:.1e})"
            )
        if floor > self.max_floor * self.tol:
            raise NotConverged(
                f"its rounding leaves a predicted residual floor of {floor:.1e} > limit {self.max_floor:g} x tol"
            )
        return result


def largest_eigenvalue(gram: torch.Tensor, steps: int = 4) -> float:
    """Return a lower estimate of the largest eigenvalue of the symmetric ``gram`` (block power iteration)."""
    generator = torch.Generator(device=gram.device)
    generator.manual_seed(SEED)
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

    The safe proposal stays ``2 * first_residual`` below the smallest Ritz value, a
    distance that provably contains an eigenvalue. It also stays at least a quarter of the
    wanted Ritz values' spread below it, which keeps the wanted eigenvalues of T within a
    factor of 5. When the smallest Ritz value moved less than that quarter since the last check
    (``lowest_change``), a closer proposal without the residual margin comes first.
    Extreme Ritz values converge fast, so it usually lies below the spectrum already, and
    the Cholesky factorization shows whether it does.
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


class SquareKrylov(ShiftInvertKrylov):
    """The block Krylov solver for a square weight A, without the Gram matrix.

    ``(A^T A)^{-1} x`` is ``A^{-1} (A^{-T} x)``. So a float64 LU factorization of A^T
    (which serves solves with A and A^T alike, see square_factor) takes k^3 * 2/3 flops in
    place of forming G (k^3 flops) and factoring it (k^3 / 3 flops). Products with G
    become two thin products with A. There is no shift: square
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
        gram_times = _chunked.products(self.a, vectors)[1]
        return (gram_times - vectors * values).norm(dim=0) / values.clamp_min(TINY).sqrt()


def square_factor(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the float64 LU factorization of the transpose of the square ``a``, or None if singular.

    The row-major float64 copy of A is A^T in column-major order, which LAPACK factors in
    place, so the factor needs no second k x k buffer. Solves with A and A^T then swap:
    ``A^{-1} x`` is the adjoint solve with this factor (see SquareKrylov._apply).
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

