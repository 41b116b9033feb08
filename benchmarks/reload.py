"""Benchmark reloading a saved adapter: kasa_peft against PEFT KaSA and PEFT LoRA.

``KasaModel.from_pretrained`` reads the removed singular triplets from the adapter file,
so a reload runs no SVD. PEFT's KaSA stores only A, B and the singular values, so
``PeftModel.from_pretrained`` truncates every targeted base weight again with a full
float32 SVD. The target is a kasa_peft reload at least 100 times faster than PEFT KaSA's on
LLaMA-7B-shaped layers.

Each method creates an adapter on a copy of the base model, fills ``lora_B`` with noise
(it starts at zero), records the output on a fixed input and saves. Then the adapter is
reloaded onto fresh copies of the base model (the same weights as a new build from the
same seed). Only the load call is timed: building or copying the base model is not.

Columns:
    create s: wrapping the base model, SVDs included (once).
    reload s: ``from_pretrained`` onto a fresh base model, median over the repeats.
    first forward s: the first forward pass of the reloaded model.
    output equal: the reloaded model's output equals the saved model's bit for bit
        (``torch.equal``), in every repeat.
    threads 1 = 2: the reloaded model's whole state dict is bit-identical whether it was
        loaded under ``torch.set_num_threads(1)`` or ``(2)``; otherwise the largest difference.
    factors = file: kasa_peft's reloaded tensors are exactly the ones in the file.

Usage:
    python benchmarks/reload.py                 # 1 LLaMA-7B-shaped decoder layer + MiniLM
    python benchmarks/reload.py --layers 2      # more decoder layers (each costs minutes of SVD)
    python benchmarks/reload.py --smoke         # tiny shapes, checks that everything runs
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import _common as common

ADAPTER_METHODS = ("kasa_peft", "peft_lora", "peft_kasa")
HEADER = (
    "method",
    "create s",
    "save s",
    "reload s",
    "vs kasa_peft",
    "first forward s",
    "file MiB",
    "output equal",
    "threads 1 = 2",
    "factors = file",
)
PERTURB_SEED = 7


@dataclass
class ReloadResult:
    """Measurements of one method's create, save and reload cycle."""

    method: str
    create_seconds: float
    save_seconds: float
    reload_seconds: list[float]
    first_forward_seconds: list[float]
    file_bytes: int
    outputs_equal: bool
    threads_difference: float | None
    factors_equal_file: bool | None


def load_adapter(method: str, base: nn.Module, directory: Path) -> nn.Module:
    """Load the adapter saved in ``directory`` onto ``base`` with the method's own loader."""
    if method == "kasa_peft":
        from kasa_peft import KasaModel

        return KasaModel.from_pretrained(base, directory)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory))


def forward_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the logits of one eval-mode forward pass without autograd."""
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def state_difference(first: nn.Module, second: nn.Module) -> float:
    """Return the largest absolute difference between two models' state dicts (0.0: bit-identical).

    Returns infinity when the state dicts have different keys or shapes.
    """
    first_state = first.state_dict()
    second_state = second.state_dict()
    if first_state.keys() != second_state.keys():
        return float("inf")
    largest = 0.0
    for key, tensor in first_state.items():
        other = second_state[key]
        if tensor.shape != other.shape:
            return float("inf")
        if not torch.equal(tensor, other):
            largest = max(largest, float((tensor.double() - other.double()).abs().max()))
    return largest


def factors_equal_file(model: nn.Module, directory: Path) -> bool:
    """Return whether every tensor kasa_peft reloaded equals the one stored in ``directory``."""
    from safetensors.torch import load_file

    from kasa_peft.adapter_files import WEIGHTS_NAME

    stored = load_file(directory / WEIGHTS_NAME)
    loaded = model.adapter_state()
    return stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k].cpu()) for k in stored)


def load_with_threads(threads: int, load: Callable[[], nn.Module]) -> nn.Module:
    """Call ``load`` with ``threads`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return load()
    finally:
        torch.set_num_threads(previous)


def benchmark_method(
    method: str,
    spec: common.ModelSpec,
    pristine: nn.Module,
    r: int,
    repeats: int,
    thread_check: bool,
    device: torch.device,
    workspace: Path,
) -> ReloadResult:
    """Create, save and reload one method's adapter; see the module docstring for the columns."""
    inputs = common.to_device({k: v for k, v in spec.batch().items() if k != "labels"}, device)
    directory = workspace / method

    create_seconds, wrapped = common.time_call(
        lambda: common.wrap(method, common.fresh_copy(pristine, device), spec, r, 2.0 * r), device
    )
    common.perturb_lora_b(wrapped.model, PERTURB_SEED)
    saved_output = forward_output(wrapped.model, inputs)
    save_seconds, _ = common.time_call(lambda: wrapped.model.save_pretrained(str(directory)), device)
    file_bytes = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    del wrapped
    gc.collect()

    reload_seconds, forward_seconds = [], []
    outputs_equal = True
    factors_match: bool | None = None
    for _ in range(repeats):
        base = common.fresh_copy(pristine, device)
        gc.collect()
        seconds, model = common.time_call(lambda: load_adapter(method, base, directory), device)
        reload_seconds.append(seconds)
        seconds, output = common.time_call(lambda: forward_output(model, inputs), device)
        forward_seconds.append(seconds)
        outputs_equal = outputs_equal and torch.equal(output, saved_output)
        if method == "kasa_peft" and factors_match is None:
            factors_match = factors_equal_file(model, directory)
        del model, base
        gc.collect()

    threads_difference = None
    if thread_check:
        single_threaded = load_with_threads(1, lambda: load_adapter(method, common.fresh_copy(pristine, device), directory))
        two_threaded = load_with_threads(2, lambda: load_adapter(method, common.fresh_copy(pristine, device), directory))
        threads_difference = state_difference(single_threaded, two_threaded)
        del single_threaded, two_threaded
        gc.collect()

    return ReloadResult(
        method=method,
        create_seconds=create_seconds,
        save_seconds=save_seconds,
        reload_seconds=reload_seconds,
        first_forward_seconds=forward_seconds,
        file_bytes=file_bytes,
        outputs_equal=outputs_equal,
        threads_difference=threads_difference,
        factors_equal_file=factors_match,
    )


def run_section(
    title: str,
    spec: common.ModelSpec,
    methods: list[str],
    r: int,
    repeats: dict[str, int],
    thread_checks: dict[str, bool],
    device: torch.device,
    notes: list[str],
    target_speedup: float | None,
    smoke: bool,
) -> tuple[str, list[ReloadResult]]:
    """Benchmark ``methods`` on one model and return the report and the results.

    ``target_speedup`` is the least acceptable ratio of PEFT KaSA's reload time to
    kasa_peft's; None prints the ratio without a verdict.
    """
    pristine = spec.build().eval()
    results = []
    with tempfile.TemporaryDirectory(prefix="kasa-reload-bench-") as workspace:
        for method in methods:
            results.append(
                benchmark_method(method, spec, pristine, r, repeats[method], thread_checks[method], device, Path(workspace))
            )
    del pristine
    gc.collect()

    ours = next((result for result in results if result.method == "kasa_peft"), None)
    ours_seconds = common.median(ours.reload_seconds) if ours else None
    rows = []
    for result in results:
        seconds = common.median(result.reload_seconds)
        rows.append(
            [
                result.method,
                result.create_seconds,
                result.save_seconds,
                seconds,
                common.ratio(seconds, ours_seconds),
                common.median(result.first_forward_seconds),
                common.mib(result.file_bytes),
                result.outputs_equal,
                _describe_difference(result.threads_difference),
                result.factors_equal_file,
            ]
        )
    lines = [f"## reload: {title}", f"{spec.description}, r={r}, targets {', '.join(spec.targets)}"]
    lines.append("reload repeats: " + ", ".join(f"{m} {repeats[m]}" for m in methods))
    lines += notes
    lines += ["", common.format_table(HEADER, rows)]
    by_method = {result.method: common.median(result.reload_seconds) for result in results}
    if ours_seconds and "peft_kasa" in by_method:
        speedup = by_method["peft_kasa"] / ours_seconds
        label = "peft_kasa reload / kasa_peft reload"
        lines.append("")
        if target_speedup is None:
            lines.append(f"{label}: {speedup:.1f}")
        else:
            lines.append(common.verdict(label, speedup, target_speedup, at_least=True, smoke=smoke))
    return "\n".join(lines), results


def _describe_difference(difference: float | None) -> str:
    if difference is None:
        return "n/a"
    return "yes" if difference == 0 else f"NO, max abs diff {difference:.1e}"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and one repeat: checks that the script runs")
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        help="decoder layers of the LLaMA-7B-shaped model (default 1). Each costs minutes of SVD and, as an estimate, "
        "3 GB of memory, because up to three float32 copies of the model are alive at once",
    )
    parser.add_argument("--r", type=int, default=16, help="adapter rank on the LLaMA-7B-shaped model (default 16)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="reloads per method to take the median of (default 3, three times that on MiniLM, 1 with --smoke; "
        "PEFT KaSA reloads the LLaMA-7B-shaped model once)",
    )
    parser.add_argument(
        "--peft-kasa-thread-check",
        action="store_true",
        help="also reload PEFT KaSA under 1 and 2 threads on the LLaMA-7B-shaped model (two more full SVD passes)",
    )
    parser.add_argument("--sections", default="llama7b,minilm", help="comma-separated subset of: llama7b, minilm")
    parser.add_argument("--methods", default=",".join(ADAPTER_METHODS), help=f"comma-separated subset of {ADAPTER_METHODS}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the timed reloads (default: torch's default; 1 with --smoke)",
    )
    arguments = parser.parse_args(argv)

    arguments.sections = [s for s in arguments.sections.split(",") if s]
    arguments.methods = [m for m in arguments.methods.split(",") if m]
    for section in arguments.sections:
        if section not in ("llama7b", "minilm"):
            parser.error(f"section {section!r} is unknown: choose from llama7b, minilm")
    for method in arguments.methods:
        if method not in ADAPTER_METHODS:
            parser.error(f"method {method!r} is unknown: choose from {', '.join(ADAPTER_METHODS)}")
    if arguments.repeats is not None and arguments.repeats < 1:
        parser.error(f"--repeats {arguments.repeats} is invalid: expected at least 1")
    if arguments.layers < 1:
        parser.error(f"--layers {arguments.layers} is invalid: expected at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    device = common.pick_device(arguments.device)
    if arguments.threads is None and arguments.smoke:
        arguments.threads = 1  # fast on a busy machine; the thread check still compares 1 and 2
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    common.quiet_libraries()
    repeats = arguments.repeats or (1 if arguments.smoke else 3)

    print("# Adapter reload benchmark" + (" (--smoke: tiny shapes, the timings mean nothing)" if arguments.smoke else ""))
    print(common.describe_environment(device))
    print("Only the from_pretrained call is timed; the base model is copied beforehand. Files are in the page cache.")
    print()

    all_results: list[ReloadResult] = []
    if "llama7b" in arguments.sections:
        if arguments.smoke:
            spec = common.llama_spec(64, 172, 1, 4, batch_size=1, seq_len=8, vocab=128)
            title = "tiny LLaMA (--smoke stand-in for the LLaMA-7B-shaped layers)"
        else:
            spec = common.llama_spec(4096, 11008, arguments.layers, 32, batch_size=1, seq_len=16, vocab=256)
            title = f"LLaMA-7B-shaped decoder layers, N={arguments.layers}"
        # PEFT KaSA runs a full SVD of every target at creation and again at each reload, which
        # takes minutes per LLaMA-7B-shaped decoder layer on a 2-core CPU, so it reloads once.
        kasa_repeats = repeats if arguments.smoke else 1
        method_repeats = {m: (kasa_repeats if m == "peft_kasa" else repeats) for m in arguments.methods}
        check_peft_kasa = arguments.peft_kasa_thread_check or arguments.smoke
        thread_checks = {m: m != "peft_kasa" or check_peft_kasa for m in arguments.methods}
        notes = [
            f"Every method uses the same N={arguments.layers} decoder layer(s), all seven projections targeted.",
            "peft_kasa reloads once and is checked across thread counts only with --peft-kasa-thread-check, "
            "because each of its loads repeats the full SVDs.",
        ]
        r = 4 if arguments.smoke else arguments.r
        report, results = run_section(
            title, spec, arguments.methods, r, method_repeats, thread_checks, device, notes, 100.0, arguments.smoke
        )
        print(report)
        print()
        all_results += results
    if "minilm" in arguments.sections:
        spec = common.minilm_spec(batch_size=4, seq_len=32)
        method_repeats = {m: repeats if arguments.smoke else 3 * repeats for m in arguments.methods}
        thread_checks = {m: True for m in arguments.methods}
        report, results = run_section(
            "all-MiniLM-L6-v2", spec, arguments.methods, 8, method_repeats, thread_checks, device, [], None, arguments.smoke
        )
        print(report)
        print()
        all_results += results

    ours = [r for r in all_results if r.method == "kasa_peft"]
    if any(not r.outputs_equal or not r.factors_equal_file or r.threads_difference for r in ours):
        print("FAILED: kasa_peft's reloaded model differs from the saved one (see the last three columns).")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
