"""Tests of scripts/run_glue.py's tables, on run folders written by the test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_glue.py"


def load_script():
    spec = importlib.util.spec_from_file_location("run_glue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root: Path, name: str, best: dict[str, float], interrupted: bool = False) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    metrics = {
        "metric": next(iter(best)),
        "metric_names": list(best),
        "best_metrics": best,
        "interrupted": interrupted,
        "wall_time_seconds": 90.0,
        "parameters": {"trainable": 74594, "trainable_percent": 0.3273},
        "hardware": {"device": "cpu", "processor": "test cpu", "cpu_count": 2, "torch_threads": 1},
        "versions": {"torch": "2.13.0", "transformers": "5.25.0"},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")


def test_table_rows_per_metric_and_method(tmp_path):
    run_glue = load_script()
    write_run(tmp_path, "mrpc-kasa", {"accuracy": 0.7353, "f1": 0.8302})
    write_run(tmp_path, "mrpc-lora", {"accuracy": 0.7402, "f1": 0.8262}, interrupted=True)
    arguments = run_glue.parse_arguments(["--output-root", str(tmp_path), "--tasks", "mrpc", "--epochs", "2"])
    lines = run_glue.results_table(arguments).splitlines()

    assert "| MRPC | accuracy | 73.53 | 74.02 (interrupted) | not run |" in lines
    assert "| MRPC | F1 | 83.02 | 82.62 (interrupted) | not run |" in lines
    assert "| MRPC | 1.5 min | 1.5 min |  |" in lines
    assert "| KaSA | 74,594 (0.33%) |" in lines
    assert any(line.startswith("- mrpc-full: `") and "--learning-rate 5e-5" in line for line in lines)


def test_copy_metrics_names_files_by_run(tmp_path):
    run_glue = load_script()
    write_run(tmp_path / "runs", "rte-full", {"accuracy": 0.5668})
    arguments = run_glue.parse_arguments(["--output-root", str(tmp_path / "runs"), "--tasks", "rte"])
    copied = run_glue.copy_metrics(arguments, tmp_path / "docs")

    assert copied == [tmp_path / "docs" / "rte-full.metrics.json"]
    assert json.loads(copied[0].read_text(encoding="utf-8"))["best_metrics"] == {"accuracy": 0.5668}
