"""Building, saving and loading the trained model for each fine-tuning method.

Methods:

- ``kasa``: this library's KaSA adapter (``kasa_peft.get_kasa_model``); the KaSA
  regularizer (``KasaModel.regularization_loss``, averaged over adapted layers) is
  added to the task loss.
- ``lora``, ``pissa``: PEFT LoRA adapters, ``pissa`` with ``init_lora_weights="pissa"``.
- ``peft-kasa``: PEFT's own KaSA variant (``LoraConfig(kasa_config=KasaConfig(...))``),
  with PEFT's regularizer ``LoraModel._get_kasa_loss()`` added to the task loss. PEFT
  0.21 sums that regularizer over layers instead of averaging it, and truncates the
  base weights in place.
- ``full``: every parameter trains and the whole model is saved.

In every method the task head (``kasa_peft.training.models.find_head_modules``) trains
in full and is saved with the adapter. PEFT is imported only
when a PEFT method is used, so ``kasa`` and ``full`` work without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.training.models import ModelLoadError, find_head_modules

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("kasa", "lora", "pissa", "full", "peft-kasa")
PEFT_METHODS: tuple[str, ...] = ("lora", "pissa", "peft-kasa")

# Learning rate used when none is given. These are common starting points (adapters
# around 5e-4, full fine-tuning of BERT-size models 2e-5 to 5e-5), not tuned values.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "kasa": 5e-4,
    "lora": 5e-4,
    "pissa": 5e-4,
    "peft-kasa": 5e-4,
    "full": 3e-5,
}


@dataclass(frozen=True)
class AdapterSettings:
    """Adapter hyper-parameters shared by the adapter methods (ignored by ``full``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    beta: float = 1e-4
    gamma: float = 1e-3
    truncation_method: str | None = None  # None: the KaSA default, "auto"
    truncation_cache: str | None = None


def _import_peft():
    try:
        import peft
    except ImportError:
        raise ModelLoadError(
            "the baseline methods lora, pissa and peft-kasa need the peft package; "
            "install it with pip install 'peft==0.21.*', or pip install -e '.[baselines]' in a clone of kasa-peft."
        ) from None
    return peft


class MethodModel:
    """A model prepared for one fine-tuning method.

    ``module`` is what the training loop calls with a batch and optimises. Subclasses
    define the regularizer, which parameters belong to the head, saving, and counts.
    """

    method: str = ""

    def __init__(self, module: nn.Module, head_modules: list[str]) -> None:
        self.module = module
        self.head_modules = list(head_modules)

    def regularization_loss(self) -> torch.Tensor | None:
        """Return the term added to the task loss, or None when the method has none."""
        return None

    def is_head_parameter(self, name: str) -> bool:
        """Return whether parameter ``name`` of ``module`` belongs to the task head."""
        dotted = f".{name}."
        return any(f".{head}." in dotted for head in self.head_modules)

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield ``(name, parameter)`` for every parameter that requires a gradient."""
        for name, parameter in self.module.named_parameters():
            if parameter.requires_grad:
                yield name, parameter

    def parameter_counts(self) -> tuple[int, int]:
        """Return ``(trainable parameters, all parameters)``."""
        parameters = list(self.module.parameters())
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        return trainable, sum(p.numel() for p in parameters)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the trained weights to ``directory``; files already there are replaced."""
        raise NotImplementedError


class KasaMethodModel(MethodModel):
    """This library's KaSA adapter; the head is a ``modules_to_save`` entry."""

    method = "kasa"

    def __init__(self, module: KasaModel, head_modules: list[str]) -> None:
        super().__init__(module, head_modules)
        self.kasa_model = module

    def regularization_loss(self) -> torch.Tensor:
        return self.kasa_model.regularization_loss()

    def parameter_counts(self) -> tuple[int, int]:
        return self.kasa_model.get_nb_trainable_parameters()

    def save(self, directory: str | os.PathLike) -> None:
        self.kasa_model.save_pretrained(directory)


class PeftMethodModel(MethodModel):
    """A PEFT LoRA-family adapter (``lora``, ``pissa`` or ``peft-kasa``)."""

    def __init__(self, module: nn.Module, head_modules: list[str], method: str) -> None:
        super().__init__(module, head_modules)
        self.method = method

    def regularization_loss(self) -> torch.Tensor | None:
        if self.method != "peft-kasa":
            return None
        loss = self.module.base_model._get_kasa_loss()
        return loss if isinstance(loss, torch.Tensor) else None

    def parameter_counts(self) -> tuple[int, int]:
        return self.module.get_nb_trainable_parameters()

    def save(self, directory: str | os.PathLike) -> None:
        _save_through_staging(directory, self.module.save_pretrained, last="adapter_config.json")


class FullMethodModel(MethodModel):
    """Full fine-tuning: every parameter trains and the whole model is saved."""

    method = "full"

    def save(self, directory: str | os.PathLike) -> None:
        _save_through_staging(directory, self.module.save_pretrained, last="config.json")


def _save_through_staging(directory: str | os.PathLike, save: Callable[[str], None], last: str) -> None:
    """Run ``save`` into a staging folder, then move its files into ``directory``.

    Each file is renamed into place, so an interruption while ``save`` writes never
    leaves a half-written file in ``directory``. ``last`` (the config file) moves last,
    after the weights it describes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        save(str(staging))
        names = sorted(path.name for path in staging.iterdir() if path.is_file())
        for name in sorted(names, key=lambda item: item == last):
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_method_model(method: str, model: nn.Module, settings: AdapterSettings) -> MethodModel:
    """Prepare ``model`` (a transformers task model, modified in place) for ``method``.

    Raises ``ValueError`` for an unknown method, and ``ModelLoadError`` when a PEFT method
    is requested without PEFT installed.
    """
    heads = find_head_modules(model)
    logger.info("Task head trained in full: %s", ", ".join(heads))
    if method == "kasa":
        config = KasaConfig(
            r=settings.r,
            alpha=settings.alpha,
            dropout=settings.dropout,
            target_modules=settings.target_modules,
            beta=settings.beta,
            gamma=settings.gamma,
            modules_to_save=heads,
            truncation_method=settings.truncation_method or "auto",
        )
        kasa_model = get_kasa_model(model, config, truncation_cache=settings.truncation_cache)
        cache = kasa_model.truncation_cache
        if cache is not None:
            logger.info(
                "Truncation cache %s (%s truncations): %d reused, %d computed",
                cache.directory,
                config.truncation_method,
                cache.hits,
                cache.misses,
            )
        return KasaMethodModel(kasa_model, heads)
    if method in PEFT_METHODS:
        peft = _import_peft()
        extra: dict[str, object] = {}
        if method == "pissa":
            extra["init_lora_weights"] = "pissa"
        elif method == "peft-kasa":
            extra["kasa_config"] = peft.KasaConfig(beta=settings.beta, gamma=settings.gamma)
        config = peft.LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
            modules_to_save=heads,
            task_type="SEQ_CLS",
            **extra,
        )
        return PeftMethodModel(peft.get_peft_model(model, config), heads, method)
    if method == "full":
        model.requires_grad_(True)
        return FullMethodModel(model, heads)
    raise ValueError(f"method {method!r} is unknown; choose one of {', '.join(METHODS)}.")


def load_trained_model(method: str, directory: str | os.PathLike, load_base: Callable[[], nn.Module]) -> nn.Module:
    """Load a model saved by ``MethodModel.save`` for inference (eval mode, no gradients).

    ``load_base`` returns a fresh base model (``load_base_model`` with the task's label
    setup); ``full`` loads the saved folder itself instead. Raises ``ModelLoadError``
    when the folder cannot be loaded, and the core's ``AdapterFileError`` when a KaSA
    adapter does not fit the base model.
    """
    directory = Path(directory)
    if method == "kasa":
        model: nn.Module = KasaModel.from_pretrained(load_base(), directory)
    elif method in PEFT_METHODS:
        peft = _import_peft()
        model = peft.PeftModel.from_pretrained(load_base(), str(directory))
    elif method == "full":
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the fine-tuned model in {directory}: {error}") from error
    else:
        raise ModelLoadError(f"method {method!r} of the saved model is unknown; expected one of {', '.join(METHODS)}.")
    model.requires_grad_(False)
    return model.eval()
