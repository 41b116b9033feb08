"""Choosing which modules of a model get a KaSA adapter."""

from __future__ import annotations

import re
import sys

from torch import nn

# Attention projections adapted when the config names no target_modules, keyed by the
# transformers ``config.model_type``. Same choice as the KaSA paper's experiments
# (query and value projections).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}


def name_matches(name: str, spec: list[str] | str) -> bool:
    """Return whether module ``name`` matches ``spec``.

    A list matches by dotted suffix (``"query"`` matches ``"layer.0.query"`` but not
    ``"layer.0.myquery"``); a string is a regular expression matched against the whole name.
    """
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in spec)


def conv1d_class() -> type | None:
    """Return transformers' ``Conv1D`` class if transformers is already imported.

    A model that contains Conv1D layers has imported transformers, so the core never has
    to import it (it is not a core dependency).
    """
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """Return whether ``module`` is a GPT-2 style Conv1D (weight stored as in x out)."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_supported_layer(module: nn.Module) -> bool:
    """Return whether KaSA can adapt ``module``: ``nn.Linear`` or transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def default_target_modules(model: nn.Module) -> list[str]:
    """Return the default targets for ``model``'s transformers model type.

    Raises:
        ValueError: the model type has no default; the message lists candidate layers.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_supported_layer(m)})
    raise ValueError(
        f"target_modules is not set and model type {model_type!r} has no default. "
        f"Set target_modules, for example to some of these layer names: {leaf_names[:20]}."
    )
