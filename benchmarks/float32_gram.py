"""Measure how accurate the r smallest singular triplets are when taken from a float32 Gram matrix.

The "auto" truncation engine forms the Gram matrix ``G = W^T W`` in float64. For tall and
wide weights that product takes half or more of the engine's time, and float32 would halve it. This
script measures what float32 would cost in accuracy, on the same random weights as
``benchmarks/truncation.py``:

* ``||G32 - G64||_2``, the rounding error of the float32 product;
* the relative residual ``max_i max(||W v_i - s_i u_i||, ||W^T u_i - s_i v_i||) / ||W||_F``
  of the best triplets within the span of the r smallest eigenvectors of ``G32``
  (Rayleigh-Ritz with float64 products with W), against the engine's tolerance.

The eigenvectors of G32 come from a dense float64 eigendecomposition of the rounded
matrix, so the residual is the floor that any solver working on G32 would reach.

Usage: ``python benchmarks/float32_gram.py`` (about a minute on 2 cores) or with
``--smoke`` for a tiny shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common  # noqa: E402
from kasa_peft.truncation import DEFAULT_TOL  # noqa: E402


def floor_residual(weight: torch.Tensor, gram32: torch.Tensor, r: int) -> float:
    """Return the relative residual of the best triplets within the r lowest eigenvectors of ``gram32``."""
    _, vectors = torch.linalg.eigh(gram32.to(torch.float64))
    w64 = weight.to(torch.float64)
    basis = vectors[:, :r]
    image = w64 @ basis
    u, s, vh = torch.linalg.svd(image, full_matrices=False)
    v = basis @ vh.mT
    left = (w64 @ v - u * s).norm(dim=0)
    right = (w64.mT @ u - v * s).norm(dim=0)
    return float(torch.maximum(left, right).max()) / float(w64.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape that runs in a second")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weight (default 0)")
    args = parser.parse_args(argv)
    out, inp = (160, 64) if args.smoke else (11008, 4096)
    ranks = (4, 16) if args.smoke else (8, 64)

    print("# float32 Gram matrix: accuracy of the smallest singular triplets")
    print(_common.describe_environment(torch.device("cpu")))
    # The same weight as benchmarks/truncation.py builds for this shape and seed.
    generator = torch.Generator().manual_seed(args.seed + out * 7 + inp)
    weight = torch.randn(out, inp, generator=generator) / inp**0.5
    tall = weight if out >= inp else weight.mT
    gram64 = tall.to(torch.float64).mT @ tall.to(torch.float64)
    gram32 = tall.mT @ tall
    error = float(torch.linalg.matrix_norm(gram32.to(torch.float64) - gram64, ord=2))
    top = float(torch.linalg.matrix_norm(gram64, ord=2))
    print(f"weight {out}x{inp}: ||G32 - G64||_2 = {error:.2e} ({error / top:.1e} of ||G||_2)")
    rows = []
    for r in ranks:
        residual = floor_residual(tall, gram32, r)
        rows.append([r, f"{residual:.2e}", f"{DEFAULT_TOL:.0e}", f"{residual / DEFAULT_TOL:.2f}"])
    print(_common.format_table(("r", "relative residual from G32", "engine tol", "residual / tol"), rows))


if __name__ == "__main__":
    main()
