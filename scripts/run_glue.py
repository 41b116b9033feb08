#!/usr/bin/env python3
"""Fine-tune the default model on five GLUE tasks with KaSA, LoRA and full fine-tuning.

Each (task, method) pair is one ``kasa-peft train`` subprocess with the same settings and
seed, written to ``<output-root>/<task>-<method>/``. Afterwards the script prints
markdown tables (every metric of each task by method, wall times, trainable parameters)
and the options of each run, and writes them to ``<output-root>/results.md``. With
``--copy-metrics DIR`` it also copies each run's ``metrics.json`` to DIR.

Tasks: RTE, MRPC, CoLA and STS-B on their full training sets, SST-2 on a seeded random
10,000 of its 67,349 training examples. Scores are on the GLUE validation sets, because
the test labels are not public.

Usage, from the repository root::

    python scripts/run_glue.py                       # all runs, then the table
    python scripts/run_glue.py --max-train-samples 64 --max-eval-samples 64 --epochs 1 \\
        --output-root runs/glue-check                # a quick check that everything works
    python scripts/run_glue.py --table-only          # rebuild the table from finished runs

Runs whose folder already contains a finished ``metrics.json`` are skipped unless
``--rerun`` is given, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"
DEFAULT_OUTPUT_ROOT = REPO_ROOT / "runs" / "glue"

TASKS = ("rte", "mrpc", "cola", "stsb", "sst2")
METHODS = ("kasa", "lora", "full")
# SST-2 has 67k training examples; a 10k subset keeps the sweep within hours on a CPU.
TASK_MAX_TRAIN_SAMPLES = {"sst2": 10_000}

# Shared by every run. The learning rates are common choices for adapters and for full
# fine-tuning of small BERT models, not tuned per task.
COMMON_SETTINGS = {
    "max-length": "128",
    "batch-size": "32",
    "epochs": "3",
    "warmup-ratio": "0.06",
    "weight-decay": "0.01",
    "seed": "42",
}
# Rank 8 on the query and value projections (kasa-peft's default targets for BERT). beta and
# gamma are PEFT 0.21's KasaConfig defaults, which its documentation gives as the reference
# GLUE values.
ADAPTER_SETTINGS = {"r": "8", "alpha": "16", "target-modules": "query,value"}
METHOD_SETTINGS = {
    "kasa": {**ADAPTER_SETTINGS, "learning-rate": "1e-3", "head-learning-rate": "1e-3", "beta": "1e-4", "gamma": "1e-3"},
    "lora": {**ADAPTER_SETTINGS, "learning-rate": "1e-3", "head-learning-rate": "1e-3"},
    "full": {"learning-rate": "5e-5", "head-learning-rate": "5e-5"},
}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"GLUE folder (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--output-root", type=Path, default=DEFAULT_OUTPUT_ROOT, help=f"run folders go here (default: {DEFAULT_OUTPUT_ROOT})")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to run (default: all)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all)")
    parser.add_argument("--model", help="base model (default: kasa-peft's default, all-MiniLM-L6-v2)")
    parser.add_argument("--max-train-samples", type=int, help="train every task on at most N examples (for a quick check)")
    parser.add_argument("--max-eval-samples", type=int, help="evaluate every task on at most N examples (for a quick check)")
    parser.add_argument("--epochs", type=int, help=f"override the epochs (default: {COMMON_SETTINGS['epochs']})")
    parser.add_argument("--device", default="auto", help="device passed to kasa-peft train (default: auto)")
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished metrics.json exists")
    parser.add_argument("--table-only", action="store_true", help="only build the table from existing runs")
    parser.add_argument("--table-file", type=Path, help="markdown output (default: <output-root>/results.md)")
    parser.add_argument(
        "--copy-metrics", type=Path, metavar="DIR", help="also copy each run's metrics.json to DIR/<task>-<method>.metrics.json"
    )
    return parser.parse_args(argv)


def run_settings(task: str, method: str, arguments: argparse.Namespace) -> dict[str, str]:
    """Return the ``kasa-peft train`` options of one run, without the data and output paths."""
    settings = dict(COMMON_SETTINGS)
    settings.update(METHOD_SETTINGS[method])
    if arguments.epochs is not None:
        settings["epochs"] = str(arguments.epochs)
    max_train_samples = arguments.max_train_samples or TASK_MAX_TRAIN_SAMPLES.get(task)
    if max_train_samples is not None:
        settings["max-train-samples"] = str(max_train_samples)
    if arguments.max_eval_samples is not None:
        settings["max-eval-samples"] = str(arguments.max_eval_samples)
    if arguments.model is not None:
        settings["model"] = arguments.model
    return settings


def train_command(task: str, method: str, arguments: argparse.Namespace) -> list[str]:
    """Return the ``kasa-peft train`` command line of one run."""
    command = [sys.executable, "-m", "kasa_peft.cli", "train", "--task", task, "--method", method]
    command += ["--data-dir", str(arguments.data_dir / task), "--output-dir", str(run_folder(task, method, arguments))]
    command += ["--device", arguments.device]
    for name, value in run_settings(task, method, arguments).items():
        command += [f"--{name}", value]
    return command


def run_folder(task: str, method: str, arguments: argparse.Namespace) -> Path:
    return arguments.output_root / f"{task}-{method}"


def finished_metrics(folder: Path) -> dict | None:
    """Return the metrics of a run that finished without interruption, else None."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if metrics.get("interrupted") or metrics.get("global_step") != metrics.get("total_steps"):
        return None
    return metrics


def run_and_wait(command: list[str]) -> int:
    """Run ``command`` and return its exit code, letting it finish cleanly on Ctrl-C.

    Ctrl-C reaches the child too, which then saves its metrics and exits with 130.
    ``subprocess.run`` would kill the child 0.25 s after the interrupt instead (CPython 3.11).
    """
    process = subprocess.Popen(command, cwd=REPO_ROOT)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.wait()
        return 130


def run_all(arguments: argparse.Namespace) -> list[str]:
    """Run every missing (task, method) pair; return the names of failed runs.

    Stops after a run that Ctrl-C interrupted (exit code 130).
    """
    failed = []
    for task in arguments.tasks:
        for method in arguments.methods:
            name = f"{task}-{method}"
            folder = run_folder(task, method, arguments)
            if not arguments.rerun and finished_metrics(folder) is not None:
                print(f"[skip] {name}: finished run in {folder}", file=sys.stderr)
                continue
            command = train_command(task, method, arguments)
            print(f"[run] {name}: {' '.join(command)}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            returncode = run_and_wait(command)
            minutes = (time.perf_counter() - started) / 60
            if returncode == 130:
                print(f"[stop] {name} was interrupted after {minutes:.1f} min; stopping the sweep", file=sys.stderr)
                failed.append(name)
                return failed
            if returncode != 0:
                print(f"[fail] {name} exited with code {returncode} after {minutes:.1f} min", file=sys.stderr)
                failed.append(name)
            else:
                print(f"[done] {name} in {minutes:.1f} min", file=sys.stderr, flush=True)
    return failed


TASK_LABELS = {"rte": "RTE", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "sst2": "SST-2 (10k)"}
METRIC_LABELS = {
    "accuracy": "accuracy",
    "f1": "F1",
    "matthews_correlation": "Matthews correlation",
    "pearson": "Pearson",
    "spearman": "Spearman",
}
METHOD_LABELS = {"kasa": "KaSA", "lora": "LoRA", "full": "full"}


def _read_metrics(task: str, method: str, arguments: argparse.Namespace) -> dict | None:
    path = run_folder(task, method, arguments) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def results_table(arguments: argparse.Namespace) -> str:
    """Return the markdown tables of every run folder that has a ``metrics.json``.

    The first table has one row per task and metric and one column per method. Every
    metric is taken at the step with the best main metric. The second table has the wall
    time of each run, the third the trainable parameters of each method.
    """
    runs = {(t, m): _read_metrics(t, m, arguments) for t in arguments.tasks for m in arguments.methods}
    methods = [METHOD_LABELS.get(m, m) for m in arguments.methods]
    lines = [
        "| task | metric | " + " | ".join(methods) + " |",
        "|---|---|" + "---:|" * len(methods),
    ]
    for task in arguments.tasks:
        finished = [runs[(task, method)] for method in arguments.methods if runs[(task, method)]]
        names = finished[0]["metric_names"] if finished else ["(none)"]
        for name in names:
            cells = []
            for method in arguments.methods:
                metrics = runs[(task, method)]
                if metrics is None:
                    cells.append("not run")
                elif metrics.get("best_metrics") is None:
                    cells.append("no evaluation")
                else:
                    cell = f"{100 * metrics['best_metrics'][name]:.2f}"
                    cells.append(cell + " (interrupted)" if metrics.get("interrupted") else cell)
            label = f"| {TASK_LABELS.get(task, task)} | {METRIC_LABELS.get(name, name)} | "
            lines.append(label + " | ".join(cells) + " |")

    lines += ["", "| task | " + " | ".join(f"{m} wall time" for m in methods) + " |", "|---|" + "---:|" * len(methods)]
    for task in arguments.tasks:
        cells = []
        for method in arguments.methods:
            metrics = runs[(task, method)]
            cells.append(f"{metrics['wall_time_seconds'] / 60:.1f} min" if metrics else "")
        lines.append(f"| {TASK_LABELS.get(task, task)} | " + " | ".join(cells) + " |")

    lines += ["", "| method | trainable parameters |", "|---|---:|"]
    for method in arguments.methods:
        finished = [runs[(task, method)] for task in arguments.tasks if runs[(task, method)]]
        if finished:
            parameters = finished[0]["parameters"]
            lines.append(
                f"| {METHOD_LABELS.get(method, method)} | {parameters['trainable']:,} "
                f"({parameters['trainable_percent']:.2f}%) |"
            )

    notes = ["", "Options of each run, besides `--task`, `--method`, `--data-dir` and `--output-dir`:", ""]
    for task in arguments.tasks:
        for method in arguments.methods:
            options = " ".join(f"--{k} {v}" for k, v in run_settings(task, method, arguments).items())
            notes.append(f"- {task}-{method}: `{options}`")
    hardware = _hardware_line(arguments)
    if hardware:
        notes += ["", f"Hardware: {hardware}."]
    return "\n".join(lines + notes) + "\n"


def copy_metrics(arguments: argparse.Namespace, destination: Path) -> list[Path]:
    """Copy each run's ``metrics.json`` to ``destination/<task>-<method>.metrics.json``."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for task in arguments.tasks:
        for method in arguments.methods:
            source = run_folder(task, method, arguments) / "metrics.json"
            if source.is_file():
                target = destination / f"{task}-{method}.metrics.json"
                shutil.copyfile(source, target)
                copied.append(target)
    return copied


def _hardware_line(arguments: argparse.Namespace) -> str | None:
    for task in arguments.tasks:
        for method in arguments.methods:
            path = run_folder(task, method, arguments) / "metrics.json"
            if path.is_file():
                metrics = json.loads(path.read_text(encoding="utf-8"))
                hardware = metrics.get("hardware", {})
                versions = metrics.get("versions", {})
                return (
                    f"{hardware.get('device')} ({hardware.get('processor')}, {hardware.get('cpu_count')} CPUs, "
                    f"torch threads per run: {hardware.get('torch_threads')}), torch {versions.get('torch')}, "
                    f"transformers {versions.get('transformers')}"
                )
    return None


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    failed: list[str] = []
    if not arguments.table_only:
        if not arguments.data_dir.is_dir():
            print(f"error: GLUE folder {arguments.data_dir} not found; pass --data-dir", file=sys.stderr)
            return 1
        failed = run_all(arguments)
    table = results_table(arguments)
    table_file = arguments.table_file or arguments.output_root / "results.md"
    table_file.parent.mkdir(parents=True, exist_ok=True)
    table_file.write_text(table, encoding="utf-8")
    print(table)
    print(f"table written to {table_file}", file=sys.stderr)
    if arguments.copy_metrics is not None:
        copied = copy_metrics(arguments, arguments.copy_metrics)
        print(f"copied {len(copied)} metrics files to {arguments.copy_metrics}", file=sys.stderr)
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
