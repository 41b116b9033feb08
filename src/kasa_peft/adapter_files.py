"""Reading and writing adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only safetensors and JSON are read, never pickle. A save writes both files under temporary
names in the target folder and renames them into place only after both are complete, so
an error or crash while writing leaves an earlier adapter in that folder intact. The config
records the SHA-256 of the weights file, so a load detects a weights file that does not
belong to its config (a crash between the two renames is the one way to get that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter folder is missing, incomplete, or inconsistent."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def apply_default_permissions(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode a plain ``open`` would give it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_adapter_folder(directory: str | os.PathLike, metadata: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``metadata`` and ``tensors`` to ``directory`` atomically; return the folder.

    ``metadata`` must be JSON-serialisable; the key ``weights_sha256`` is added.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu_tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    temporary: list[Path] = []
    try:
        weights_fd, weights_tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
        os.close(weights_fd)
        temporary.append(Path(weights_tmp))
        save_file(cpu_tensors, weights_tmp, metadata={"format": "pt"})
        _fsync(Path(weights_tmp))

        record = dict(metadata, weights_sha256=_sha256(Path(weights_tmp)))
        config_fd, config_tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
        temporary.append(Path(config_tmp))
        with os.fdopen(config_fd, "w", encoding="utf-8") as handle:
            # Keys keep their order: targets are listed in model order.
            json.dump(record, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

        apply_default_permissions(weights_tmp)
        apply_default_permissions(config_tmp)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
        temporary.clear()
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    logger.info("saved adapter to %s (%d tensors)", directory, len(cpu_tensors))
    return directory


def read_adapter_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter folder written by ``write_adapter_folder``.

    Raises:
        AdapterFileError: a file is missing, the config is not valid JSON, or the weights
            file is not the one the config was written with.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFileError(
                f"{path} not found: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}, "
                "as written by KasaModel.save_pretrained."
            )
    try:
        metadata = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"{config_path} is not valid JSON ({error}); save the adapter again.") from None
    if metadata.get("method") != "kasa":
        raise AdapterFileError(
            f"{config_path} describes method {metadata.get('method')!r}, not 'kasa'; "
            "this folder was not written by kasa_peft."
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{config_path} has format_version {version!r}; this kasa_peft reads version {FORMAT_VERSION}. "
            "Upgrade kasa_peft or save the adapter again."
        )
    expected_sha = metadata.get("weights_sha256")
    if expected_sha is not None and _sha256(weights_path) != expected_sha:
        raise AdapterFileError(
            f"{weights_path} does not match {config_path} (SHA-256 differs); the folder contains files from two "
            "different saves, for example after an interrupted save. Save the adapter again."
        )
    return metadata, load_file(weights_path, device="cpu")
