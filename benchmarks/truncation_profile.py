"""Show where the "auto" truncation engine spends its time on one weight.

Times the engine's internal steps (the Gram product in float32 or float64, Cholesky and
LU factorizations, Krylov block steps, Rayleigh-Ritz checks, orthonormalization, the
float64 refinement after a float32 Gram matrix, the products with W) by wrapping them
for one call, and prints the block steps taken. That count also includes the operator
applications after a shift, which are not "Krylov block steps" calls, so it can exceed
that row's calls. For scale it also measures this machine's float64 and float32
matrix-multiply rates.

The weight is the same Gaussian one that ``benchmarks/truncation.py`` builds for the
shape and seed. Steps nest (a block step contains its orthonormalization and inverse
solves), so the rows do not add up to the total.

Usage: ``python benchmarks/truncation_profile.py --shape 11008x4096 --rank 64`` (about
10 s on 2 cores), or ``--smoke`` for a tiny 320x128 weight with the dense eigensolver
switched off, so that the Krylov and float32 Gram code still runs (about 10 s, mostly
starting Python and torch).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common  # noqa: E402
from kasa_peft import _chunked, _krylov, truncation  # noqa: E402

# Module functions and solver methods to time, with the label printed for each. The
# engine calls these through their modules, so replacing the module attribute times them.
FUNCTIONS = {
    (_chunked, "gram"): "Gram product",
    (_krylov, "largest_eigenvalue"): "largest eigenvalue estimate (float32 Gram)",
    (truncation, "_refine"): "float64 refinement (float32 Gram)",
    (_krylov, "cholesky_shifted"): "Cholesky factorizations",
    (_krylov, "square_factor"): "LU factorization (square weights)",
    (_chunked, "products"): "products with W",
    (_krylov, "orthonormalize"): "orthonormalization",
}
METHODS = {
    "_expand": "Krylov block steps",
    "_apply": "inverse solves",
    "_rayleigh_ritz": "Rayleigh-Ritz checks",
}


def timed(function: Callable, label: str, totals: dict[str, list[float]]) -> Callable:
    """Return ``function`` wrapped so that each call adds its count and seconds to ``totals[label]``.

    The Gram product's label also names the dtype it was called with.
    """
    names_dtype = function is _chunked.gram  # checked now, before the module attribute is replaced

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            key = label
            if names_dtype:
                dtype = args[1] if len(args) > 1 else kwargs.get("dtype", torch.float64)
                key = f"{label} ({str(dtype).removeprefix('torch.')})"
            entry = totals.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - start

    return wrapper


def matmul_rate(dtype: torch.dtype) -> float:
    """Return the GFLOP/s of a 4096 x 2048 x 4096 matrix product in ``dtype``, best of three."""
    a = torch.randn(2048, 4096, dtype=dtype)
    b = torch.randn(2048, 4096, dtype=dtype)
    a.mT @ b
    best = min(_seconds(lambda: a.mT @ b) for _ in range(3))
    return 2 * 2048 * 4096 * 4096 / best / 1e9


def _seconds(call: Callable) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def profile(weight: torch.Tensor, r: int) -> tuple[float, dict[str, list[float]], int]:
    """Return the total seconds, per-step totals and block steps of one ``"auto"`` call."""
    totals: dict[str, list[float]] = {}
    originals = {key: getattr(*key) for key in FUNCTIONS}
    solver_classes = (_krylov.ShiftInvertKrylov, _krylov.SquareKrylov)
    method_originals = [(cls, name, cls.__dict__[name]) for cls in solver_classes for name in METHODS if name in cls.__dict__]
    steps = []
    original_solve = _krylov.ShiftInvertKrylov.solve

    def solve(self, *args, **kwargs):
        try:
            return original_solve(self, *args, **kwargs)
        finally:
            steps.append(self.steps)

    try:
        for (module, name), label in FUNCTIONS.items():
            setattr(module, name, timed(originals[module, name], label, totals))
        for cls, name, function in method_originals:
            setattr(cls, name, timed(function, METHODS[name], totals))
        _krylov.ShiftInvertKrylov.solve = solve
        seconds = _seconds(lambda: truncation.smallest_singular_triplets(weight, r))
    finally:
        for (module, name), function in originals.items():
            setattr(module, name, function)
        for cls, name, function in method_originals:
            setattr(cls, name, function)
        _krylov.ShiftInvertKrylov.solve = original_solve
    return seconds, totals, sum(steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="11008x4096", help="weight shape OUTxIN (default 11008x4096)")
    parser.add_argument("--rank", type=int, default=64, help="rank r (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weight (default 0)")
    parser.add_argument("--smoke", action="store_true", help="a tiny 320x128 weight at r=4 (plumbing check)")
    args = parser.parse_args(argv)
    try:
        out, inp = (int(size) for size in ("320x128" if args.smoke else args.shape).lower().split("x"))
    except ValueError:
        parser.error(f"--shape {args.shape!r} is invalid: expected OUTxIN, such as 11008x4096")
    r = 4 if args.smoke else args.rank
    if args.smoke:
        truncation._DENSE_MAX_K = 0  # a weight this small would take the dense eigensolver

    print("# Truncation profile")
    print(_common.describe_environment(torch.device("cpu")))
    print(f"matmul rate: float64 {matmul_rate(torch.float64):.1f} GFLOP/s, float32 {matmul_rate(torch.float32):.1f} GFLOP/s")
    # The same weight as benchmarks/truncation.py builds for this shape and seed.
    generator = torch.Generator().manual_seed(args.seed + out * 7 + inp)
    weight = torch.randn(out, inp, generator=generator) / inp**0.5
    truncation.smallest_singular_triplets(weight[:300, :200].contiguous(), 4)  # warm up the libraries
    seconds, totals, steps = profile(weight, r)

    print(f"weight {out}x{inp}, r={r}: {seconds:.3f} s in all, {steps} Krylov block steps")
    rows = [[label, count, f"{total:.3f}"] for label, (count, total) in sorted(totals.items(), key=lambda item: -item[1][1])]
    print(_common.format_table(("step", "calls", "seconds"), rows))


if __name__ == "__main__":
    main()
