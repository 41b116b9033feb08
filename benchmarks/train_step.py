"""Benchmark one training step of kasa_peft against PEFT LoRA, PEFT KaSA and full fine-tuning.

A step is forward, backward and an AdamW step, with the method's regularizer added to the
loss where it has one (``KasaModel.regularization_loss`` and PEFT's ``_get_kasa_loss``).
The targets are that ``kasa_peft``'s step time stays within 5% of PEFT LoRA's and no slower
than PEFT KaSA's, and its peak memory within 5% of LoRA's.

Time and memory are measured apart, because each needs a different set-up:

* Step time: one process per model builds every method and runs them in turns, a few
  steps each, rotating the order every round. All methods then see the same machine
  state, so slow phases of a shared CPU hit them alike. Separate processes per method
  gave ratios that moved by up to 13% between runs.
* Memory: every (model, method) pair runs in its own process, so that a peak never
  includes memory that another method freed but the allocator kept.

Columns:
    step ms: median over all timed steps of the interleaved run.
    peak MiB: peak resident memory during the steps (CPU) or ``max_memory_allocated`` (CUDA).
    over base MiB: that peak minus the memory after building the base model, i.e. the
        adapter, its activations, gradients and optimizer state.

Usage:
    python benchmarks/train_step.py              # full shapes (minutes; see --help)
    python benchmarks/train_step.py --smoke      # tiny shapes, checks that everything runs
    python benchmarks/train_step.py --profile kasa_peft --models llama
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import _common as common

RESULT_PREFIX = "RESULT "
HEADER = ("method", "step ms", "vs LoRA", "peak MiB", "vs LoRA", "over base MiB", "vs LoRA", "trainable", "setup s")

def train_step(wrapped: common.Wrapped, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """Run forward, backward and one optimizer step; return the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = wrapped.model(**batch).loss
    if wrapped.regularizer is not None:
        loss = loss + wrapped.regularizer()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def prepare(method: str, model: str, shape: dict[str, Any], device: torch.device) -> tuple[Any, ...]:
    """Build the base model and batch, wrap the model for ``method``; return what a run needs."""
    spec = common.build_spec(model, shape)
    base = spec.build().to(device)
    batch = common.to_device(spec.batch(), device)
    gc.collect()
    memory_base = _memory_now(device)
    dropout = shape.get("dropout", 0.0)
    setup_seconds, wrapped = common.time_call(
        lambda: common.wrap(method, base, spec, shape["r"], 2.0 * shape["r"], dropout), device
    )
    wrapped.model.train()
    parameters = common.trainable_parameters(wrapped.model)
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    return spec, wrapped, batch, optimizer, memory_base, setup_seconds, sum(p.numel() for p in parameters)


def measure_memory(method: str, model: str, shape: dict[str, Any], device: torch.device, steps: int) -> dict:
    """Run ``steps`` training steps of one method and record its peak memory and set-up time."""
    _, wrapped, batch, optimizer, memory_base, setup_seconds, trainable = prepare(method, model, shape, device)
    gc.collect()
    peak_reset = _reset_peak(device)
    for _ in range(steps):
        train_step(wrapped, batch, optimizer)
    common.synchronize(device)
    return {
        "kind": "memory",
        "method": method,
        "model": model,
        "peak_bytes": _memory_peak(device),
        "base_bytes": memory_base,
        "peak_reset": peak_reset,
        "setup_seconds": setup_seconds,
        "trainable": trainable,
    }


def measure_time(
    methods: list[str], model: str, shape: dict[str, Any], device: torch.device, warmup: int, steps: int, rounds: int
) -> list[dict]:
    """Time every method in one process: ``rounds`` turns of ``steps`` steps each, in rotating order."""
    prepared = {}
    for method in methods:
        torch.manual_seed(0)
        _, wrapped, batch, optimizer, *_ = prepare(method, model, shape, device)
        for _ in range(warmup):
            train_step(wrapped, batch, optimizer)
        prepared[method] = (wrapped, batch, optimizer)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            wrapped, batch, optimizer = prepared[method]
            for _ in range(steps):
                seconds, _ = common.time_call(lambda: train_step(wrapped, batch, optimizer), device)
                times[method].append(seconds)
    return [{"kind": "time", "method": method, "model": model, "step_seconds": times[method]} for method in methods]


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return common.current_rss_bytes()


def _reset_peak(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return common.reset_peak_rss()


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return common.peak_rss_bytes()


def run_child(request: dict[str, Any]) -> None:
    """Run the requested measurement and print one RESULT line per (model, method) pair."""
    torch.set_num_threads(request["threads"])
    common.quiet_libraries()
    device = torch.device(request["device"])
    for model in request["models"]:
        shape = request["shapes"][model]
        if request["kind"] == "time":
            results = measure_time(
                request["methods"], model, shape, device, request["warmup"], request["steps"], request["rounds"]
            )
        else:
            results = []
            for method in request["methods"]:
                torch.manual_seed(0)
                results.append(measure_memory(method, model, shape, device, request["warmup"] + request["steps"]))
        for result in results:
            print(RESULT_PREFIX + json.dumps(result), flush=True)


def launch_child(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one child process and return its results; raise RuntimeError if it fails."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(request)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    pairs = f"methods {request['methods']} on models {request['models']}"
    if completed.returncode != 0:
        raise RuntimeError(f"child for {pairs} failed with exit code {completed.returncode}:\n{completed.stderr[-4000:]}")
    results = [json.loads(line[len(RESULT_PREFIX) :]) for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if len(results) != len(request["models"]) * len(request["methods"]):
        raise RuntimeError(f"child for {pairs} printed {len(results)} results:\n{completed.stdout}")
    return results


def summarize(
    model: str, spec: common.ModelSpec, shape: dict[str, Any], results: list[dict[str, Any]], smoke: bool
) -> str:
    """Return the report for one model: its table and the ratios the targets refer to."""
    by_method: dict[str, dict[str, float]] = {}
    for method in common.METHODS:
        timing = [r for r in results if r["kind"] == "time" and r["method"] == method and r["model"] == model]
        memory = [r for r in results if r["kind"] == "memory" and r["method"] == method and r["model"] == model]
        if not timing or not memory:
            continue
        by_method[method] = {
            "step": common.median(timing[0]["step_seconds"]),
            "peak": memory[0]["peak_bytes"],
            "over": memory[0]["peak_bytes"] - memory[0]["base_bytes"],
            "setup": memory[0]["setup_seconds"],
            "trainable": memory[0]["trainable"],
        }

    lora = by_method.get("peft_lora", {})
    rows = []
    for method, summary in by_method.items():
        rows.append(
            [
                method,
                summary["step"] * 1000,
                common.ratio(summary["step"], lora.get("step")),
                common.mib(summary["peak"]),
                common.ratio(summary["peak"], lora.get("peak")),
                common.mib(summary["over"]),
                common.ratio(summary["over"], lora.get("over")),
                f"{summary['trainable']:,d}",
                summary["setup"],
            ]
        )

    lines = [f"## train step: {model}", f"{spec.description}, r={shape['r']}, targets {', '.join(spec.targets)}", ""]
    lines.append(common.format_table(HEADER, rows))
    ours = by_method.get("kasa_peft")
    if ours and lora:
        lines.append("")
        lines.append(common.verdict("kasa_peft / peft_lora step time", ours["step"] / lora["step"], 1.05, smoke=smoke))
        over_ratio = ours["over"] / lora["over"]
        lines.append(common.verdict("kasa_peft / peft_lora peak memory over base", over_ratio, 1.05, smoke=smoke))
    if ours and "peft_kasa" in by_method:
        kasa_ratio = ours["step"] / by_method["peft_kasa"]["step"]
        lines.append(common.verdict("kasa_peft / peft_kasa step time", kasa_ratio, 1.0, smoke=smoke))
    if smoke:
        lines.append("NOTE: --smoke measures the memory of every method in one process, so those columns are not comparable.")
    if any(not r.get("peak_reset", True) for r in results):
        lines.append("NOTE: the peak-RSS reset failed, so peaks include model setup (process lifetime ru_maxrss).")
    return "\n".join(lines)


def profile(method: str, models: list[str], shapes: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Print torch.profiler's operator table for three steps of ``method`` on each model."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for model in models:
        _, wrapped, batch, optimizer, *_ = prepare(method, model, shapes[model], device)
        for _ in range(2):
            train_step(wrapped, batch, optimizer)
        with torch_profile(activities=activities) as recording:
            for _ in range(3):
                train_step(wrapped, batch, optimizer)
            common.synchronize(device)
        print(f"## profile: {method} on {model}, 3 steps")
        sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(recording.key_averages().table(sort_by=sort_key, row_limit=25))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few steps: checks that the script runs")
    parser.add_argument("--models", default="minilm,llama", help="comma-separated subset of: minilm, llama")
    parser.add_argument("--methods", default=",".join(common.METHODS), help=f"comma-separated subset of {common.METHODS}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's default; 1 with --smoke, which stays fast on a busy machine)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default 2, smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method and round (default 2, smoke 1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of turns in rotating order (default 10, smoke 2)")
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="adapter dropout of every adapter method (default 0)"
    )
    parser.add_argument("--profile", metavar="METHOD", help="print a torch.profiler table for METHOD instead of benchmarking")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)

    arguments.models = [m for m in arguments.models.split(",") if m]
    arguments.methods = [m for m in arguments.methods.split(",") if m]
    for method in arguments.methods + ([arguments.profile] if arguments.profile else []):
        if method not in common.METHODS:
            parser.error(f"method {method!r} is unknown: choose from {', '.join(common.METHODS)}")
    for model in arguments.models:
        if model not in common.FULL_SHAPES:
            parser.error(f"model {model!r} is unknown: choose from {', '.join(common.FULL_SHAPES)}")
    if not 0.0 <= arguments.dropout < 1.0:
        parser.error(f"--dropout {arguments.dropout} is invalid: expected a probability in [0, 1)")
    for name in ("warmup", "steps", "rounds"):
        value = getattr(arguments, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} {value} is invalid: expected at least {0 if name == 'warmup' else 1}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        run_child(json.loads(arguments.child))
        return 0

    device = common.pick_device(arguments.device)
    if arguments.threads is None:
        arguments.threads = 1 if arguments.smoke else torch.get_num_threads()
    torch.set_num_threads(arguments.threads)
    common.quiet_libraries()
    shapes = common.SMOKE_SHAPES if arguments.smoke else common.FULL_SHAPES
    shapes = {model: dict(shape, dropout=arguments.dropout) for model, shape in shapes.items()}
    if arguments.profile:
        profile(arguments.profile, arguments.models, shapes, device)
        return 0
    defaults = {"warmup": 1, "steps": 1, "rounds": 2} if arguments.smoke else {"warmup": 2, "steps": 2, "rounds": 10}
    counts = {name: value if getattr(arguments, name) is None else getattr(arguments, name) for name, value in defaults.items()}

    print("# Training step benchmark" + (" (--smoke: tiny shapes, the timings mean nothing)" if arguments.smoke else ""))
    print(common.describe_environment(device))
    print(
        f"step time: {counts['warmup']} warm-up steps per method, then {counts['rounds']} rounds of "
        f"{counts['steps']} steps per method in rotating order, in one process per model; "
        f"AdamW lr 1e-5, alpha = 2 r, adapter dropout {arguments.dropout:g}"
    )
    print()

    # Memory: every (model, method) pair in its own process (see the module docstring).
    # --smoke runs them all in one process, to save interpreter start-ups.
    base_request = {"shapes": shapes, "device": str(device), "threads": arguments.threads, **counts}
    requests = [dict(base_request, kind="time", models=[model], methods=arguments.methods) for model in arguments.models]
    if arguments.smoke:
        requests.append(dict(base_request, kind="memory", models=arguments.models, methods=arguments.methods))
    else:
        requests.extend(
            dict(base_request, kind="memory", models=[model], methods=[method])
            for model in arguments.models
            for method in arguments.methods
        )
    results: list[dict[str, Any]] = []
    failures = 0
    for request in requests:
        try:
            results.extend(launch_child(request))
        except RuntimeError as error:
            failures += 1
            print(f"FAILED: {error}", file=sys.stderr)
    for model in arguments.models:
        print(summarize(model, common.build_spec(model, shapes[model]), shapes[model], results, arguments.smoke))
        print()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
