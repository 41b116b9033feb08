#!/usr/bin/env bash
# Create a virtual environment (default .venv) and install kasa-peft into it.
#
# torch comes first: on a machine without an NVIDIA GPU this installs the CPU build, since
# a plain `pip install torch` on Linux downloads a multi-GB CUDA build. A torch that is
# already importable in the environment is kept, so GPU users keep theirs: create the
# environment yourself with their torch, or set KASA_SYSTEM_TORCH=1 to let the new
# environment see the system's site-packages.
#
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "test"; "train" is enough for the demo)
set -euo pipefail

cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
python=${PYTHON:-python3}
extras=${1:-test}
cpu_torch=${KASA_CPU_TORCH:-torch==2.13.0+cpu}
cpu_index=${KASA_CPU_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x "$venv/bin/python" ]; then
    if [ "${KASA_SYSTEM_TORCH:-0}" = 1 ]; then
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip)

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the default (CUDA) torch build"
    "${pip[@]}" install torch
else
    echo "setup: no NVIDIA GPU found, installing the CPU build $cpu_torch"
    # One retry: where the CPU index is unreachable but a local copy of the wheel exists,
    # pip would otherwise wait through five retries for each of torch's dependencies.
    "${pip[@]}" install --retries 1 "$cpu_torch" --extra-index-url "$cpu_index"
fi

"${pip[@]}" install -e ".[$extras]"
