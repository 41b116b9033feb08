"""Benchmark inference with adapters, merged and unmerged, against the plain base model.

``merge_and_unload`` folds the adapter into the weights and returns plain ``Linear``
layers, so a merged kasa_peft model should run exactly as fast as the base model. The
unmerged kasa_peft layer computes two rank-r branches (the removed triplets and the
update), against one for PEFT LoRA and PEFT KaSA; its overhead over the base model is
reported beside theirs.

All variants live in one process and are called in rotating order, one forward pass each
per round, so a change in machine load affects every variant alike. Forward passes run in
eval mode under ``torch.no_grad`` on the same batch.

Columns:
    forward ms: median over the rounds (after warm-up rounds).
    vs base: that median divided by the base model's.
    plain layers: the model contains exactly the base model's module types, in the same
        order (checked for the merged model).
    max abs diff vs unmerged: largest absolute logit difference between the merged and the
        unmerged kasa_peft model (float32 rounding of the merged weights).

Usage:
    python benchmarks/inference.py            # full shapes (minutes)
    python benchmarks/inference.py --smoke    # tiny shapes, checks that everything runs
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import _common as common

VARIANTS = ("base", "kasa_peft", "kasa_peft merged", "peft_lora", "peft_kasa")
HEADER = ("variant", "forward ms", "vs base", "plain layers", "max abs diff vs unmerged")
PERTURB_SEED = 7


def module_types(model: nn.Module) -> list[type]:
    """Return the class of every submodule, in ``modules()`` order."""
    return [type(module) for module in model.modules()]


def build_variants(spec: common.ModelSpec, r: int, device: torch.device) -> dict[str, nn.Module]:
    """Return every variant of one model, each on its own copy of the base weights, in eval mode."""
    from kasa_peft import KasaModel

    pristine = spec.build().eval()
    variants: dict[str, nn.Module] = {"base": common.fresh_copy(pristine, device)}
    ours = common.wrap("kasa_peft", common.fresh_copy(pristine, device), spec, r, 2.0 * r).model
    common.perturb_lora_b(ours, PERTURB_SEED)
    variants["kasa_peft"] = ours
    # The merged model is the same adapter, reloaded from disk onto another copy (no second SVD).
    with tempfile.TemporaryDirectory(prefix="kasa-inference-bench-") as directory:
        ours.save_pretrained(directory)
        variants["kasa_peft merged"] = KasaModel.from_pretrained(common.fresh_copy(pristine, device), directory).merge_and_unload()
    for method in ("peft_lora", "peft_kasa"):
        model = common.wrap(method, common.fresh_copy(pristine, device), spec, r, 2.0 * r).model
        common.perturb_lora_b(model, PERTURB_SEED)
        variants[method] = model
    for model in variants.values():
        model.eval()
    return variants


def time_variants(
    variants: dict[str, nn.Module], inputs: dict[str, torch.Tensor], warmup: int, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Call every variant once per round in rotating order; return the timed seconds per variant."""
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for round_index in range(warmup + rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed, _ = common.time_call(lambda: variants[name](**inputs), device)
                if round_index >= warmup:
                    seconds[name].append(elapsed)
    return seconds


def run_model(model: str, shape: dict, warmup: int, rounds: int, device: torch.device, smoke: bool) -> tuple[str, bool]:
    """Benchmark every variant on one model; return the report and whether the merge checks passed."""
    spec = common.build_spec(model, shape)
    variants = build_variants(spec, shape["r"], device)
    inputs = common.to_device({k: v for k, v in spec.batch().items() if k != "labels"}, device)
    with torch.no_grad():
        unmerged = variants["kasa_peft"](**inputs).logits
        merged = variants["kasa_peft merged"](**inputs).logits
    merge_difference = float((merged - unmerged).abs().max())
    base_types = module_types(variants["base"])
    merged_plain = module_types(variants["kasa_peft merged"]) == base_types

    seconds = time_variants(variants, inputs, warmup, rounds, device)
    base_seconds = common.median(seconds["base"])
    rows = []
    for name in variants:
        typical = common.median(seconds[name])
        plain, difference = None, None
        if name == "base":
            plain = True
        elif name == "kasa_peft merged":
            plain, difference = merged_plain, merge_difference
        rows.append([name, typical * 1000, common.ratio(typical, base_seconds), plain, difference])
    del variants
    gc.collect()

    lines = [f"## inference: {model}", f"{spec.description}, r={shape['r']}, targets {', '.join(spec.targets)}"]
    lines += ["", common.format_table(HEADER, rows), ""]
    merged_ratio = common.median(seconds["kasa_peft merged"]) / base_seconds
    lines.append(
        f"kasa_peft merged / base forward time: {merged_ratio:.3f} (with plain layers no adapter code runs, "
        "so a difference from 1 is timing noise)"
    )
    unmerged_ratio = common.median(seconds["kasa_peft"]) / base_seconds
    lora_ratio = common.median(seconds["peft_lora"]) / base_seconds
    lines.append(
        f"unmerged overhead over base: kasa_peft {100 * (unmerged_ratio - 1):+.1f}%, "
        f"peft_lora {100 * (lora_ratio - 1):+.1f}%" + (" [--smoke shapes: not meaningful]" if smoke else "")
    )
    # Merged weights are W - U S Vh + B d A rounded once to float32, so logits differ from the
    # unmerged sum by float32 rounding only; 1e-3 is far above that and far below a lost adapter.
    passed = merged_plain and merge_difference < 1e-3
    if not passed:
        lines.append("FAILED: the merged model is not plain base layers, or its output differs from the unmerged one.")
    return "\n".join(lines), passed


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and two rounds: checks that the script runs")
    parser.add_argument("--models", default="minilm,llama", help="comma-separated subset of: minilm, llama")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's default; 1 with --smoke)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, smoke 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, smoke 2)")
    arguments = parser.parse_args(argv)
    arguments.models = [m for m in arguments.models.split(",") if m]
    for model in arguments.models:
        if model not in common.FULL_SHAPES:
            parser.error(f"model {model!r} is unknown: choose from {', '.join(common.FULL_SHAPES)}")
    if arguments.rounds is not None and arguments.rounds < 1:
        parser.error(f"--rounds {arguments.rounds} is invalid: expected at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    device = common.pick_device(arguments.device)
    defaults = {"threads": 1, "warmup": 1, "rounds": 2} if arguments.smoke else {"warmup": 2, "rounds": 10}
    threads = arguments.threads or defaults.get("threads") or torch.get_num_threads()
    warmup = arguments.warmup if arguments.warmup is not None else defaults["warmup"]
    rounds = arguments.rounds if arguments.rounds is not None else defaults["rounds"]
    torch.set_num_threads(threads)
    common.quiet_libraries()
    shapes = common.SMOKE_SHAPES if arguments.smoke else common.FULL_SHAPES

    print("# Inference benchmark" + (" (--smoke: tiny shapes, the timings mean nothing)" if arguments.smoke else ""))
    print(common.describe_environment(device))
    print(f"{warmup} warm-up round(s), {rounds} timed round(s), eval mode, torch.no_grad")
    print()
    all_passed = True
    for model in arguments.models:
        report, passed = run_model(model, shapes[model], warmup, rounds, device, arguments.smoke)
        all_passed = all_passed and passed
        print(report)
        print()
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
