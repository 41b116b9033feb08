"""``KasaModel``: wraps any PyTorch model and manages its named KaSA adapters."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .adapter_files import AdapterFileError, read_adapter_folder, write_adapter_folder
from .base_match import ADAPTER_TENSORS, match_base_model
from .config import KasaConfig
from .fingerprint import weight_checksum, weight_fingerprint
from .layer import KasaLayer, total_regularization
from .modules_to_save import ModulesToSaveWrapper
from .targeting import default_target_modules, is_supported_layer, name_matches
from .truncation import Truncation, smallest_singular_triplets, validate_rank
from .truncation_cache import TruncationCache

logger = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"
_MODULES_TO_SAVE_PREFIX = "modules_to_save."
# Show a progress bar over layers when the targets hold more weights than this.
_PROGRESS_MIN_ELEMENTS = 100_000_000


def _progress(items: list, enabled: bool, description: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="layer")


class KasaModel(nn.Module):
    """A model whose targeted layers carry KaSA adapters.

    Calling it forwards every argument to the wrapped model, and unknown attributes are
    looked up on the wrapped model, so ``generate``, ``config`` and the like work as before.
    The wrapped model is modified in place: targeted layers are replaced by ``KasaLayer``
    and ``modules_to_save`` by ``ModulesToSaveWrapper``. ``unload()`` undoes that.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KasaConfig,
        adapter_name: str = DEFAULT_ADAPTER,
        *,
        truncation_cache: Any = None,
    ) -> None:
        if isinstance(model, KasaModel):
            raise TypeError("model is already a KasaModel; call add_adapter on it instead of wrapping it again.")
        truncation_cache = _as_truncation_cache(truncation_cache)
        requires_grad = [parameter.requires_grad for parameter in model.parameters()]
        self._init_empty(model, truncation_cache)
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            # add_adapter already put the layers back; give the parameters back their flags.
            for parameter, flag in zip(model.parameters(), requires_grad):
                parameter.requires_grad_(flag)
            raise
        self.set_adapter(adapter_name)

    def _init_empty(self, model: nn.Module, truncation_cache: Any = None) -> None:
        nn.Module.__init__(self)
        self.base_model = model
        self.peft_config: dict[str, KasaConfig] = {}
        self.active_adapter: str | None = None
        self.truncation_cache = truncation_cache
        self._unloaded = False
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    # ----- plumbing -------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_usable()
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model's ``generate`` (transformers generation models)."""
        self._check_usable()
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _check_usable(self) -> None:
        if self._unloaded:
            raise RuntimeError(
                "this KasaModel was unloaded or merged; use the model that unload() or merge_and_unload() returned."
            )

    def kasa_layers(self) -> Iterator[tuple[str, KasaLayer]]:
        """Yield ``(module name, layer)`` for every adapted layer, names relative to the wrapped model."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, KasaLayer):
                yield name, module

    def _saved_module_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _replace_module(self, name: str, new_module: nn.Module) -> None:
        parent_name, _, child_name = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        setattr(parent, child_name, new_module)

    # ----- adding and choosing adapters ---------------------------------------------------

    def _find_targets(self, config: KasaConfig) -> list[tuple[str, nn.Module]]:
        spec = config.target_modules if config.target_modules is not None else default_target_modules(self.base_model)
        targets: list[tuple[str, nn.Module]] = []
        for name, module in self.base_model.named_modules():
            if not name or _is_wrapper_internal(name) or isinstance(module, ModulesToSaveWrapper):
                continue
            if not name_matches(name, spec):
                continue
            if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
                continue
            base = module.base_layer if isinstance(module, KasaLayer) else module
            if not is_supported_layer(base):
                raise TypeError(
                    f"module {name!r} matches target_modules={spec!r} but is a {type(base).__name__}; KaSA adapts "
                    "only torch.nn.Linear and transformers Conv1D layers. Narrow target_modules to those layers."
                )
            targets.append((name, module))
        if not targets:
            candidates = sorted(
                {n.rsplit(".", 1)[-1] for n, m in self.base_model.named_modules() if is_supported_layer(m)}
            )
            raise ValueError(
                f"target_modules={spec!r} matched no module of {type(self.base_model).__name__}. "
                f"Linear/Conv1D layer names in this model include: {candidates[:20]}."
            )
        return targets

    def _compute_truncation(self, matrix: torch.Tensor, r: int, method: str) -> Truncation:
        if self.truncation_cache is not None:
            return self.truncation_cache.get_or_compute(matrix, r, method)
        return smallest_singular_triplets(matrix, r, method)

    def add_adapter(
        self,
        adapter_name: str,
        config: KasaConfig,
        *,
        truncations: dict[str, Truncation] | None = None,
        exact_module_names: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` to the targeted layers (it does not become active).

        Args:
            adapter_name: a new name without dots.
            config: the adapter's hyper-parameters.
            truncations: precomputed removed triplets by module name; modules missing here
                are truncated now (``from_pretrained`` passes the stored ones).
            exact_module_names: match ``modules_to_save`` entries as full module names
                rather than suffixes.
        """
        self._check_usable()
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} is invalid: use a non-empty name without dots.")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or choose another name.")
        if not isinstance(config, KasaConfig):
            raise TypeError(f"config must be a KasaConfig, got {type(config).__name__}.")

        targets = self._find_targets(config)
        saved_modules = self._find_modules_to_save(config.modules_to_save or [], exact=exact_module_names)
        # Validate every rank before the first (possibly slow) truncation, so bad input fails fast.
        for name, module in targets:
            layer = module if isinstance(module, KasaLayer) else KasaLayer(module)
            validate_rank(config.rank_for(name), tuple(layer.base_weight_matrix().shape), name=name)

        total_elements = sum(m.weight.numel() for _, m in targets)
        # What to undo if anything fails: (layer or wrapper, module it replaced or None).
        changed: list[tuple[nn.Module, str, nn.Module | None]] = []
        try:
            show_progress = truncations is None and total_elements > _PROGRESS_MIN_ELEMENTS
            for name, module in _progress(targets, show_progress, "KaSA truncation"):
                layer = module if isinstance(module, KasaLayer) else KasaLayer(module)
                r = config.rank_for(name)
                truncation = (truncations or {}).get(name)
                if truncation is not None and truncation.rank != r:
                    raise ValueError(
                        f"stored truncation of module {name!r} has rank {truncation.rank} but the config asks for r={r}."
                    )
                if truncation is None:
                    try:
                        truncation = self._compute_truncation(layer.base_weight_matrix(), r, config.truncation_method)
                    except ValueError as error:
                        raise ValueError(f"cannot truncate module {name!r}: {error}") from None
                layer.add_adapter(adapter_name, truncation, config.scaling_for(name), config.dropout)
                changed.append((layer, name, None if layer is module else module))
                if layer is not module:
                    self._replace_module(name, layer)
                logger.debug("added adapter %r to %s (r=%d)", adapter_name, name, r)
            for name, module in saved_modules:
                wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
                wrapper.add_adapter(adapter_name)
                changed.append((wrapper, name, None if wrapper is module else module))
                if wrapper is not module:
                    self._replace_module(name, wrapper)
        except BaseException:
            self._undo_add(adapter_name, changed)
            raise

        self.peft_config[adapter_name] = config
        self._set_trainable()
        logger.info("added KaSA adapter %r to %d layers", adapter_name, len(targets))

    def _undo_add(self, adapter_name: str, changed: list[tuple[nn.Module, str, nn.Module | None]]) -> None:
        for module, name, replaced in reversed(changed):
            adapters = module.kasa_adapters if isinstance(module, KasaLayer) else module.copies
            if adapter_name in adapters:
                del adapters[adapter_name]
            if replaced is not None:
                self._replace_module(name, replaced)

    def _find_modules_to_save(self, specs: list[str], exact: bool = False) -> list[tuple[str, nn.Module]]:
        found: list[tuple[str, nn.Module]] = []
        for spec in specs:
            matches = [
                (name, module)
                for name, module in self.base_model.named_modules()
                if name
                and (name == spec if exact else name_matches(name, [spec]))
                and not isinstance(module, KasaLayer)
                and not _is_wrapper_internal(name)
            ]
            if not matches:
                raise ValueError(
                    f"modules_to_save entry {spec!r} matched no module; check the name (a suffix such as 'classifier')."
                )
            found.extend(matches)
        return found

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter and the only trainable one."""
        self._check_usable()
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}.")
        for _, layer in self.kasa_layers():
            if layer.merged_adapter is not None and layer.merged_adapter != adapter_name:
                raise RuntimeError(f"adapter {layer.merged_adapter!r} is merged; call unmerge_adapter() first.")
            layer.active_adapter = adapter_name if adapter_name in layer.kasa_adapters else None
        for _, wrapper in self._saved_module_wrappers():
            wrapper.active_adapter = adapter_name if adapter_name in wrapper.copies else None
        self.active_adapter = adapter_name
        self._set_trainable()

    def _set_trainable(self, trainable: bool = True) -> None:
        for _, layer in self.kasa_layers():
            for name, adapter in layer.kasa_adapters.items():
                adapter.requires_grad_(trainable and name == self.active_adapter)
        for _, wrapper in self._saved_module_wrappers():
            for name, copy in wrapper.copies.items():
                copy.requires_grad_(trainable and name == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer."""
        self._check_usable()
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}.")
        for _, layer in self.kasa_layers():
            if adapter_name in layer.kasa_adapters:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self._saved_module_wrappers():
            if adapter_name in wrapper.copies:
                wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the original model inside this context: adapters and saved-module copies are bypassed.

        A merged adapter is unmerged for the duration (exactly, from the kept weight) and
        merged again afterwards.
        """
        self._check_usable()
        merged = [(layer, layer.merged_adapter) for _, layer in self.kasa_layers() if layer.merged_adapter is not None]
        for layer, _ in merged:
            layer.unmerge()
        switched = [m for _, m in self.kasa_layers()] + [m for _, m in self._saved_module_wrappers()]
        previous = [m.disabled for m in switched]
        for module in switched:
            module.disabled = True
        try:
            yield
        finally:
            for module, was_disabled in zip(switched, previous):
                module.disabled = was_disabled
            for layer, name in merged:
                layer.merge(name)

    # ----- the regularizer --------------------------------------------------------------

    def regularization_loss(self, adapter_name: str | None = None) -> torch.Tensor:
        """Return the KaSA regularizer of one adapter (default: the active one).

        Per adapted layer ``beta * sum(d^2) + gamma * (||B^T B - I_r||_F + ||A A^T - I_r||_F)``,
        summed over layers and divided by their number, in float32. Add it to the task
        loss: ``loss = task_loss + model.regularization_loss()``.
        """
        self._check_usable()
        adapter_name = adapter_name or self.active_adapter
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}.")
        config = self.peft_config[adapter_name]
        adapters = [
            layer.kasa_adapters[adapter_name] for _, layer in self.kasa_layers() if adapter_name in layer.kasa_adapters
        ]
        return total_regularization(adapters, config.beta, config.gamma, config.gram_convention) / len(adapters)

    # ----- merging and unloading --------------------------------------------------------

    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Fold an adapter into the base weights in place, keeping the originals for ``unmerge_adapter``."""
        self._check_usable()
        adapter_name = adapter_name or self.active_adapter
        if adapter_name != self.active_adapter:
            self.set_adapter(adapter_name)
        for _, layer in self.kasa_layers():
            if adapter_name in layer.kasa_adapters:
                layer.merge(adapter_name, keep_original=True)

    def unmerge_adapter(self) -> None:
        """Restore the exact base weights replaced by ``merge_adapter``."""
        self._check_usable()
        for _, layer in self.kasa_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Return the wrapped model with the active adapter folded into its weights.

        Adapted layers become plain ``Linear``/``Conv1D`` layers with weight
        ``W - U diag(S) Vh + scaling * B diag(d) A``, and saved modules become the active
        adapter's copies. This KasaModel cannot be used afterwards.
        """
        self._check_usable()
        if self.active_adapter is None:
            raise ValueError("no active adapter to merge; call set_adapter first.")
        for name, layer in list(self.kasa_layers()):
            if layer.merged_adapter is not None:
                layer.unmerge()
            if self.active_adapter in layer.kasa_adapters:
                layer.merge(self.active_adapter, keep_original=False)
            self._replace_module(name, layer.base_layer)
        for name, wrapper in list(self._saved_module_wrappers()):
            self._replace_module(name, wrapper.current_module())
        return self._finish_unload()

    def unload(self) -> nn.Module:
        """Return the wrapped model with every adapter removed and its original weights."""
        self._check_usable()
        for name, layer in list(self.kasa_layers()):
            layer.unmerge()
            self._replace_module(name, layer.base_layer)
        for name, wrapper in list(self._saved_module_wrappers()):
            self._replace_module(name, wrapper.original_module)
        return self._finish_unload()

    def _finish_unload(self) -> nn.Module:
        model = self.base_model
        self._unloaded = True
        return model

    # ----- parameter counts -------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Return ``(trainable parameters, all parameters)``.

        Like PEFT, the total counts every parameter once: base model, adapters, and the
        per-adapter copies of ``modules_to_save``. Removed triplets are buffers, not parameters.
        """
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ----- saving and loading -----------------------------------------------------------

    def adapter_state(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Return adapter ``adapter_name``'s tensors by file key (as ``save_pretrained`` writes them)."""
        adapter_name = adapter_name or self.active_adapter
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.kasa_layers():
            if adapter_name not in layer.kasa_adapters:
                continue
            adapter = layer.kasa_adapters[adapter_name]
            for tensor_name in ADAPTER_TENSORS:
                tensors[f"{name}.{tensor_name}"] = getattr(adapter, tensor_name)
            with torch.no_grad():
                weight = layer._weight_before_merge if layer.merged_adapter else layer.base_layer.weight
                matrix = weight.T if layer.fan_in_fan_out else weight
                tensors[f"{name}.base_fingerprint"] = weight_fingerprint(matrix)
                tensors[f"{name}.base_checksum"] = weight_checksum(weight)
        for name, wrapper in self._saved_module_wrappers():
            if adapter_name in wrapper.copies:
                for key, value in wrapper.copies[adapter_name].state_dict().items():
                    tensors[f"{_MODULES_TO_SAVE_PREFIX}{name}.{key}"] = value
        return tensors

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Write an adapter to ``save_directory`` (one folder per adapter), atomically.

        The folder contains ``adapter_config.json`` and ``adapter_model.safetensors`` with
        A, B, d, the removed triplets, saved modules and a fingerprint of each base weight.
        """
        self._check_usable()
        adapter_name = adapter_name or self.active_adapter
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}.")
        targets = {}
        for name, layer in self.kasa_layers():
            if adapter_name in layer.kasa_adapters:
                out_features, in_features = layer.base_weight_matrix().shape
                targets[name] = {
                    "shape": [out_features, in_features],
                    "layer_type": "Conv1D" if layer.fan_in_fan_out else "Linear",
                    "r": layer.kasa_adapters[adapter_name].r,
                    "base_dtype": str(layer.base_layer.weight.dtype).removeprefix("torch."),
                }
        base_config = getattr(self.base_model, "config", None)
        metadata = {
            "method": "kasa",
            "format_version": 1,
            "kasa_peft_version": __version__,
            "config": self.peft_config[adapter_name].to_dict(),
            "base_model": {
                "class": type(self.base_model).__name__,
                "name_or_path": getattr(base_config, "_name_or_path", None) or None,
            },
            "targets": targets,
            "modules_to_save": sorted(n for n, w in self._saved_module_wrappers() if adapter_name in w.copies),
        }
        return write_adapter_folder(save_directory, metadata, self.adapter_state(adapter_name))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_path: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
    ) -> "KasaModel":
        """Load an adapter saved by ``save_pretrained`` onto ``model`` without any SVD.

        Raises:
            AdapterFileError: the folder is missing, incomplete, or does not fit ``model``
                (the message names the first mismatching module).
        """
        metadata, tensors = read_adapter_folder(adapter_path)
        config = KasaConfig.from_dict(metadata["config"])
        truncations = match_base_model(model, metadata, tensors, adapter_path)
        instance = cls.__new__(cls)
        instance._init_empty(model)
        instance._load_adapter_tensors(adapter_name, config, metadata, tensors, truncations)
        instance.set_adapter(adapter_name)
        if not is_trainable:
            instance._set_trainable(False)
            instance.eval()
        return instance

    def load_adapter(self, adapter_path: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Load a saved adapter as ``adapter_name`` beside the existing ones (it does not become active)."""
        self._check_usable()
        metadata, tensors = read_adapter_folder(adapter_path)
        config = KasaConfig.from_dict(metadata["config"])
        truncations = match_base_model(self.base_model, metadata, tensors, adapter_path)
        self._load_adapter_tensors(adapter_name, config, metadata, tensors, truncations)
        if not is_trainable:
            for _, layer in self.kasa_layers():
                if adapter_name in layer.kasa_adapters:
                    layer.kasa_adapters[adapter_name].requires_grad_(False)

    def _load_adapter_tensors(
        self,
        adapter_name: str,
        config: KasaConfig,
        metadata: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        truncations: dict[str, Truncation],
    ) -> None:
        # Target exactly the saved modules, whatever target_modules would match today.
        names = list(metadata["targets"])
        exact = KasaConfig.from_dict({**config.to_dict(), "target_modules": "|".join(re.escape(n) for n in names)})
        exact.modules_to_save = list(metadata.get("modules_to_save", []))
        exact.exclude_modules = None
        self.add_adapter(adapter_name, exact, truncations=truncations, exact_module_names=True)
        self.peft_config[adapter_name] = config
        try:
            with torch.no_grad():
                for name, layer in self.kasa_layers():
                    if name not in truncations:
                        continue
                    adapter = layer.kasa_adapters[adapter_name]
                    for tensor_name in ("lora_A", "lora_B", "lora_diag"):
                        target = getattr(adapter, tensor_name)
                        target.copy_(tensors[f"{name}.{tensor_name}"].to(target.dtype))
            for module_name in exact.modules_to_save:
                prefix = f"{_MODULES_TO_SAVE_PREFIX}{module_name}."
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                wrapper = self.base_model.get_submodule(module_name)
                wrapper.copies[adapter_name].load_state_dict(state)
        except (RuntimeError, KeyError) as error:
            self.delete_adapter(adapter_name)
            raise AdapterFileError(f"adapter tensors do not fit the model: {error}. Save the adapter again.") from error
        self._set_trainable()


_WRAPPER_PARTS = frozenset({"base_layer", "kasa_adapters", "copies", "original_module"})


def _is_wrapper_internal(module_name: str) -> bool:
    """Return whether a module lies inside a KasaLayer or ModulesToSaveWrapper, not in the user's model."""
    return not _WRAPPER_PARTS.isdisjoint(module_name.split("."))


def _as_truncation_cache(cache: Any) -> Any:
    """Return ``cache`` as an object with ``get_or_compute``, turning a folder path into a TruncationCache."""
    if cache is None or callable(getattr(cache, "get_or_compute", None)):
        return cache
    if isinstance(cache, str | os.PathLike):
        return TruncationCache(cache)
    raise TypeError(
        f"truncation_cache={cache!r} is invalid: expected a folder path, a TruncationCache(folder) "
        "or None."
    )


def get_kasa_model(
    model: nn.Module,
    config: KasaConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    truncation_cache: Any = None,
) -> KasaModel:
    """Wrap ``model`` with a new KaSA adapter; only adapter parameters and ``modules_to_save`` train.

    Args:
        model: any ``nn.Module``; it is modified in place.
        config: the adapter's hyper-parameters.
        adapter_name: the adapter's name.
        truncation_cache: a folder path or ``TruncationCache(folder)`` that reuses
            truncations across runs on the same base weights, or any object with
            ``get_or_compute(matrix, r, method)``; None computes every truncation.
    """
    return KasaModel(model, config, adapter_name, truncation_cache=truncation_cache)
