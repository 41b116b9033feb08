"""Loading base models and tokenizers, finding the task head, and choosing the device."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Head names of transformers task models, used when the model has no ``base_model_prefix``.
KNOWN_HEAD_NAMES: tuple[str, ...] = ("classifier", "score", "pre_classifier", "qa_outputs", "lm_head")


class ModelLoadError(ValueError):
    """A base model, tokenizer or saved model cannot be loaded."""


def resolve_device(name: str) -> torch.device:
    """Return the device for ``name``: ``"auto"`` picks CUDA when available, else the CPU.

    Raises ``ValueError`` for an unknown device string or a CUDA device without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is invalid ({error}); use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use --device cpu or auto.")
    return device


def find_head_modules(model: nn.Module) -> list[str]:
    """Return the names of the task-head modules of a transformers task model.

    The head is every top-level child with parameters other than the backbone, which
    transformers names ``model.base_model_prefix`` (``classifier`` next to ``bert`` in
    ``BertForSequenceClassification``). Models without that attribute fall back to
    ``KNOWN_HEAD_NAMES``. Raises ``ValueError`` when no head is found.
    """
    prefix = getattr(model, "base_model_prefix", "")
    heads = []
    if prefix and hasattr(model, prefix):
        for name, child in model.named_children():
            if name != prefix and any(True for _ in child.parameters()):
                heads.append(name)
    if not heads:
        heads = [name for name, _ in model.named_children() if name in KNOWN_HEAD_NAMES]
    if not heads:
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"cannot find the task head of {type(model).__name__}: its top-level modules are {children}. "
            "Use a transformers model with a sequence-classification head."
        )
    return heads


def load_tokenizer(model_name_or_path: str) -> Any:
    """Load the model's tokenizer; give it a pad token (its EOS token) if it has none.

    Raises ``ModelLoadError`` when the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load the tokenizer of {model_name_or_path!r}: {error}. Pass a local model folder that contains "
            "its tokenizer files, or a hub id that is cached."
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        logger.info("Tokenizer has no pad token; padding with its EOS token %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_name_or_path: str,
    *,
    num_labels: int,
    problem_type: str,
    labels: tuple[str, ...] | list[str] | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
    """Load ``AutoModelForSequenceClassification`` in float32 with the task's label setup.

    Regression uses one output and ``problem_type="regression"``; classification sets
    ``id2label`` and ``label2id`` from ``labels``. ``pad_token_id`` is copied into the
    model config when it has none (decoder models need it to find the last token). A
    head that the checkpoint lacks is newly initialised from torch's global random
    generator, so seed it first. Raises ``ModelLoadError`` when the model cannot be loaded.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if problem_type == "regression":
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        if labels is not None:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {label: index for index, label in enumerate(labels)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load model {model_name_or_path!r} for sequence classification: {error}. Pass a local model "
            "folder, or a hub id that is cached (no network is used when HF_HUB_OFFLINE=1)."
        ) from error
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def check_max_length(model: nn.Module, max_length: int) -> None:
    """Raise ``ValueError`` when ``max_length`` exceeds the positions the model can embed.

    The limit is ``max_position_embeddings``, less the offset of models whose position
    embedding reserves its first rows for padding: RoBERTa numbers positions from
    ``pad_token_id + 1``, so its 514 positions hold 512 tokens.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            limit = min(limit, module.num_embeddings - module.padding_idx - 1)
            break
    if max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the {limit} token positions the model can embed; "
            f"pass --max-length {limit} or less."
        )
