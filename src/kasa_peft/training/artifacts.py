"""The files of a training output folder, and the run information saved with a model.

An output folder contains:

- the best model, written by ``MethodModel.save``: ``adapter_config.json`` and
  ``adapter_model.safetensors`` for the adapter methods (task head included), or
  ``config.json`` and ``model.safetensors`` for ``full``;
- ``kasa_peft_task.json`` (``RunInfo``): method, base model, task, label mapping, max
  length and text columns, everything ``kasa-peft evaluate`` and ``predict`` need to
  rebuild the model;
- ``label_mapping.json`` for classification tasks;
- ``train_config.json``: the resolved training options;
- ``metrics.json``: evaluation history, best score, parameter counts, time, memory,
  versions and hardware;
- ``train.log``: the training log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kasa_peft._version import __version__
from kasa_peft.adapter_files import apply_default_permissions

logger = logging.getLogger(__name__)

RUN_INFO_NAME = "kasa_peft_task.json"
LABEL_MAPPING_NAME = "label_mapping.json"
TRAIN_CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.json"
LOG_NAME = "train.log"
RUN_INFO_FORMAT_VERSION = 1


class RunInfoError(ValueError):
    """A model folder lacks ``kasa_peft_task.json`` or the file is invalid."""


@dataclass
class RunInfo:
    """Description of the task a saved model was trained for, stored as ``kasa_peft_task.json``.

    Attributes:
        method: the fine-tuning method (``kasa``, ``lora``, ``pissa``, ``full``, ``peft-kasa``).
        base_model: the base model's folder (absolute) or hub id.
        task: the task as ``TaskSpec.to_dict`` returns it, with absolute file paths.
        labels: the classification labels in class-id order, None for regression.
        max_length: the tokenization limit used in training.
    """

    method: str
    base_model: str
    task: dict[str, Any]
    labels: list[str] | None
    max_length: int
    kasa_peft_version: str = __version__
    format_version: int = RUN_INFO_FORMAT_VERSION

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``kasa_peft_task.json`` into ``directory``."""
        write_json(Path(directory) / RUN_INFO_NAME, asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RunInfo:
        """Read ``kasa_peft_task.json`` from ``directory``; raise ``RunInfoError`` if it is missing or invalid."""
        path = Path(directory) / RUN_INFO_NAME
        if Path(directory).is_file():
            raise RunInfoError(
                f"{str(directory)!r} is a file, not a model folder; pass the folder that contains it, the "
                "--output-dir of a training run."
            )
        if not Path(directory).is_dir():
            raise RunInfoError(f"model folder {str(directory)!r} not found; pass the --output-dir of a training run.")
        if not path.is_file():
            raise RunInfoError(
                f"{path} not found: {directory} is not a kasa-peft training output, or training was stopped before "
                "the first checkpoint. Pass the --output-dir of a finished training run."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise RunInfoError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format_version") != RUN_INFO_FORMAT_VERSION:
            raise RunInfoError(
                f"{path} has format_version {data.get('format_version') if isinstance(data, dict) else None!r}; "
                f"this kasa-peft reads version {RUN_INFO_FORMAT_VERSION}. Train the model again with this version."
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunInfoError(f"{path} has unknown keys {unknown}; it was written by another kasa-peft version.")
        try:
            return cls(**data)
        except TypeError as error:
            raise RunInfoError(f"{path} is incomplete: {error}") from None


# Files a previous run may have left: the run's own files and what each method saves.
_PREVIOUS_RUN_FILES = (
    RUN_INFO_NAME,
    LABEL_MAPPING_NAME,
    METRICS_NAME,
    "adapter_config.json",
    "adapter_model.safetensors",
    "config.json",
    "model.safetensors",
    "README.md",
)


def remove_previous_run(directory: str | os.PathLike) -> list[str]:
    """Delete the model and result files of an earlier run in ``directory``; return their names.

    Only a folder that contains ``kasa_peft_task.json`` counts as an earlier output
    folder, so a folder without it is left untouched. This keeps a new run from mixing
    its files with an older model, for example when the new run stops before its
    first checkpoint.
    """
    directory = Path(directory)
    if not (directory / RUN_INFO_NAME).is_file():
        return []
    removed = []
    for name in _PREVIOUS_RUN_FILES:
        path = directory / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        apply_default_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class TrainLog:
    """Context manager that copies the ``kasa_peft`` log records to ``train.log``.

    Records are held in memory until ``open_file`` is called, so a run that fails its
    checks before that point leaves the output folder as it was. The handler is attached
    to the ``kasa_peft`` logger at INFO level and removed on exit, so runs in one process
    do not write into each other's logs.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOG_NAME
        self.handler = logging.handlers.MemoryHandler(capacity=2**31, flushLevel=logging.CRITICAL + 1)
        self.handler.setLevel(logging.INFO)
        self._file: logging.FileHandler | None = None
        self._previous_level: int | None = None

    def __enter__(self) -> TrainLog:
        package_logger = logging.getLogger("kasa_peft")
        self._previous_level = package_logger.level
        if package_logger.getEffectiveLevel() > logging.INFO:
            package_logger.setLevel(logging.INFO)
        package_logger.addHandler(self.handler)
        return self

    def open_file(self) -> None:
        """Create ``train.log``, write the records held so far and every later one to it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.FileHandler(self.path, mode="w", encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setTarget(self._file)
        # A MemoryHandler passes records on only when its buffer is full, so a capacity of 1
        # after this flush writes each record as it comes.
        self.handler.flush()
        self.handler.capacity = 1

    def __exit__(self, *exc_info: object) -> None:
        package_logger = logging.getLogger("kasa_peft")
        package_logger.removeHandler(self.handler)
        if self._file is not None:
            self.handler.flush()
            self._file.close()
        self.handler.setTarget(None)
        self.handler.close()
        if self._previous_level is not None:
            package_logger.setLevel(self._previous_level)


def environment_info(device: torch.device) -> dict[str, Any]:
    """Return library versions and a description of the hardware the run used."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "kasa_peft": __version__}
    for name in ("transformers", "peft"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", None)
    hardware: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": _processor_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "hardware": hardware}


def _processor_name() -> str:
    """Return the CPU model from ``/proc/cpuinfo`` on Linux, else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement on a CUDA device (CPU peaks cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Return the peak memory of the run in bytes and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` since ``reset_peak_memory``. CPU: the
    process's maximum resident set size (``getrusage``), which includes everything the
    process did before training, such as loading the model.
    """
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "measure": "torch.cuda.max_memory_allocated"}
    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return {"bytes": None, "measure": "unavailable on this platform"}
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"bytes": int(max_rss * scale), "measure": "getrusage max RSS of the process"}
