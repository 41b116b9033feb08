"""Checking that a model is the base model an adapter was saved for."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter_files import AdapterFileError
from .fingerprint import fingerprint_mismatch, fingerprint_tolerance, weight_checksum, weight_fingerprint
from .layer import KasaLayer
from .targeting import is_conv1d, is_supported_layer
from .truncation import Truncation

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_diag", "removed_U", "removed_S", "removed_Vh")


def match_base_model(
    model: nn.Module, metadata: dict[str, Any], tensors: dict[str, torch.Tensor], adapter_path: Any
) -> dict[str, Truncation]:
    """Check that ``model`` is the base an adapter was saved on; return the stored triplets by module.

    Raises:
        AdapterFileError: naming the first targeted module that is missing, has another
            type or shape, or whose weight fingerprint differs beyond the dtype tolerance.
    """
    modules = dict(model.named_modules())
    truncations: dict[str, Truncation] = {}
    for name, info in metadata["targets"].items():
        module = modules.get(name)
        if isinstance(module, KasaLayer):
            module = module.base_layer
        if module is None:
            raise AdapterFileError(
                f"module {name!r} of the adapter in {adapter_path} does not exist in {type(model).__name__}; "
                "load the adapter onto the base model it was trained on."
            )
        if not is_supported_layer(module):
            raise AdapterFileError(f"module {name!r} is a {type(module).__name__}, but the adapter expects {info['layer_type']}.")
        weight = module.weight
        matrix = weight.T if is_conv1d(module) else weight
        if list(matrix.shape) != list(info["shape"]):
            raise AdapterFileError(
                f"module {name!r} has weight shape {list(matrix.shape)} (out, in) but the adapter in {adapter_path} "
                f"was saved for {info['shape']}; load it onto the base model it was trained on."
            )
        missing = [t for t in ADAPTER_TENSORS + ("base_fingerprint",) if f"{name}.{t}" not in tensors]
        if missing:
            raise AdapterFileError(f"{adapter_path} lacks tensors {missing} for module {name!r}; save the adapter again.")
        saved_dtype = getattr(torch, info.get("base_dtype", "float32"), torch.float32)
        checksum = tensors.get(f"{name}.base_checksum")
        if saved_dtype == weight.dtype and checksum is not None:
            if not torch.equal(weight_checksum(weight), checksum):
                raise AdapterFileError(
                    f"base weight of module {name!r} differs from the one the adapter in {adapter_path} was trained "
                    "on (its checksum differs, and both are stored as "
                    f"{str(weight.dtype).removeprefix('torch.')}). Load the adapter onto the same base checkpoint "
                    "it was saved with."
                )
            difference = None
        else:
            tolerance = fingerprint_tolerance(saved_dtype, weight.dtype)
            current = weight_fingerprint(matrix.detach())
            difference = fingerprint_mismatch(tensors[f"{name}.base_fingerprint"], current, tolerance)
        if difference is not None:
            raise AdapterFileError(
                f"base weight of module {name!r} differs from the one the adapter in {adapter_path} was trained on "
                f"(relative fingerprint difference {difference:.3g}, tolerance {tolerance:.3g}). Load the adapter "
                "onto the same base checkpoint it was saved with."
            )
        truncations[name] = Truncation(
            U=tensors[f"{name}.removed_U"], S=tensors[f"{name}.removed_S"], Vh=tensors[f"{name}.removed_Vh"]
        )
    return truncations
