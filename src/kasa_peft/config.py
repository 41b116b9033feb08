"""Configuration of one KaSA adapter."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .truncation import TRUNCATION_METHODS

GRAM_CONVENTIONS = ("paper", "reference-code")


@dataclass
class KasaConfig:
    """Hyper-parameters of one KaSA adapter.

    Attributes:
        r: adapter rank, and the number of smallest singular triplets removed from each
            targeted weight. Must be below ``min(out_features, in_features)`` of every target.
        alpha: scaling numerator. The update is ``alpha / r * B diag(d) A``, or
            ``alpha / sqrt(r) * B diag(d) A`` with ``use_rslora``.
        dropout: dropout probability applied to the adapter branch's input.
        target_modules: module-name suffixes (``["query", "value"]`` matches
            ``encoder.layer.0.attention.self.query``) or one regular expression that must
            match the whole module name. ``None`` picks a default for known model types.
        exclude_modules: suffixes or a regular expression of modules never to adapt.
        beta: weight of the singular-value penalty ``sum(d^2)``.
        gamma: weight of the orthogonality penalty on ``B`` and ``A``.
        use_rslora: use the rank-stabilised scaling ``alpha / sqrt(r)``.
        rank_pattern: per-module ``r``, keyed by a suffix or regular expression.
        alpha_pattern: per-module ``alpha``, keyed like ``rank_pattern``.
        modules_to_save: modules outside the adapted layers (a task head, say) that are
            trained in full and saved with the adapter, matched by suffix.
        truncation_method: how the smallest singular triplets are computed, one of
            ``TRUNCATION_METHODS`` (``"exact"`` is a full SVD).
        gram_convention: ``"paper"`` penalises the r x r Gram matrices
            ``||B^T B - I_r||_F + ||A A^T - I_r||_F`` as the KaSA paper defines it.
            ``"reference-code"`` reproduces the authors' released code, which uses
            ``||B B^T - I_out||_F + ||A^T A - I_in||_F``; it is computed without forming
            those large matrices and exists only to compare with that code.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    beta: float = 1e-4
    gamma: float = 1e-3
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    truncation_method: str = "auto"
    gram_convention: str = "paper"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        _check_rank("r", self.r)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        _check_positive("alpha", self.alpha)
        for key, value in self.alpha_pattern.items():
            _check_positive(f"alpha_pattern[{key!r}]", value)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is invalid: expected a probability in [0, 1).")
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0 (0 disables the term).")
        if self.truncation_method not in TRUNCATION_METHODS:
            raise ValueError(
                f"truncation_method={self.truncation_method!r} is unknown: expected one of {TRUNCATION_METHODS}."
            )
        if self.gram_convention not in GRAM_CONVENTIONS:
            raise ValueError(f"gram_convention={self.gram_convention!r} is unknown: expected one of {GRAM_CONVENTIONS}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as error:
                    raise ValueError(f"{name}={value!r} is not a valid regular expression: {error}.") from None
            elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name}={value!r} is invalid: expected a list of module-name suffixes or a regex string.")
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError("target_modules is empty: name at least one module suffix, or pass None for the default.")

    def rank_for(self, module_name: str) -> int:
        """Return the rank for ``module_name``, from ``rank_pattern`` or ``r``."""
        return _pattern_value(module_name, self.rank_pattern, self.r)

    def alpha_for(self, module_name: str) -> float:
        """Return alpha for ``module_name``, from ``alpha_pattern`` or ``alpha``."""
        return _pattern_value(module_name, self.alpha_pattern, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        """Return the update's scaling factor for ``module_name``."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "KasaConfig":
        """Build a config from ``to_dict`` output; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown KasaConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**values)

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "KasaConfig":
        """Parse a JSON string, or read a ``.json`` file when given a path."""
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and text_or_path.endswith(".json")):
            text = Path(text_or_path).read_text(encoding="utf-8")
        else:
            text = text_or_path
        return cls.from_dict(json.loads(text))


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: the rank must be a positive integer, such as 8.")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number > 0.")


def pattern_key_matches(key: str, module_name: str) -> bool:
    """Return whether a rank/alpha pattern key matches ``module_name``.

    A key matches when it is a suffix of the dotted name or a regular expression that
    matches a dotted suffix of it (``"layer\\.0\\..*query"``, say).
    """
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name) is not None


def _pattern_value(module_name: str, pattern: dict[str, Any], default: Any) -> Any:
    for key, value in pattern.items():
        if pattern_key_matches(key, module_name):
            return value
    return default
