"""Label parsing and the mapping between classification labels and class ids.

Classification labels are kept as strings. ``normalize_label`` turns the values that
files contain (TSV/CSV text, JSON strings, integers or integral floats) into one
canonical string, so that ``1``, ``"1"``, ``" 1 "`` and ``1.0`` are the same label.

``LabelMapping`` assigns class ids in a stable order that does not depend on the order
of rows in a file or on sampling:

- if every label is an integer, labels are sorted numerically (``"-1" < "0" < "2" <
  "10"``), so GLUE's ``0``/``1`` labels get ids 0 and 1;
- otherwise labels are sorted by Python string order (Unicode code points), for
  example ``account < billing < shipping < technical``.

The mapping is saved as JSON (``{"labels": [...]}``, index = class id) next to a trained
adapter and loaded again to encode evaluation files and decode predictions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kasa_peft.data.errors import DataError, DataFileNotFoundError, UnknownLabelError

_INTEGER_RE = re.compile(r"[+-]?\d+")


def normalize_label(value: object) -> str:
    """Return the canonical string form of a classification label.

    Surrounding whitespace is removed. Integer strings get their canonical decimal
    form (``"+01"`` becomes ``"1"``), and an integral JSON float such as ``1.0``
    becomes ``"1"``. JSON booleans become ``"true"`` and ``"false"``. Raises ``DataError`` for a
    missing or empty label and for values that are not strings or numbers.
    """
    if value is None:
        raise DataError("the label is missing (null)")
    if isinstance(value, bool):
        # bool is a subclass of int, but True/False labels are names, not numbers.
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"the label {value!r} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise DataError(f"the label {value!r} has type {type(value).__name__}; expected a string or a number")

    text = value.strip()
    if not text:
        raise DataError("the label is empty")
    if _INTEGER_RE.fullmatch(text):
        return str(int(text))
    return text


def parse_regression_label(value: object) -> float:
    """Return a regression label as a float.

    Accepts numbers and numeric strings such as ``"3.800"``. Raises ``DataError`` for
    a missing value, text that is not a number, and NaN or infinity.
    """
    if value is None:
        raise DataError("the label is missing (null)")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"the label {value!r} is not a number; regression labels must be numeric, e.g. 3.8")

    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise DataError(f"the label {value!r} is not a number; regression labels must be numeric, e.g. 3.8") from None
    if not math.isfinite(number):
        raise DataError(f"the label {value!r} is not a finite number; regression labels must be finite")
    return number


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    distinct = set(labels)
    if all(_INTEGER_RE.fullmatch(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


@dataclass(frozen=True)
class LabelMapping:
    """Classification labels in class-id order: ``labels[i]`` is the label of class ``i``.

    Labels are canonical strings (see ``normalize_label``). Build one with
    ``from_labels`` to get the documented stable order, or pass ``labels`` directly to
    fix the order yourself.
    """

    labels: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if not labels:
            raise DataError("a label mapping needs at least one label; the training data has none")
        for label in labels:
            if not isinstance(label, str) or not label:
                raise DataError(f"label {label!r} in the label mapping is invalid: labels must be non-empty strings")
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise DataError(f"the label mapping lists these labels more than once: {duplicates}")
        object.__setattr__(self, "_ids", {label: index for index, label in enumerate(labels)})

    @classmethod
    def from_labels(cls, labels: Iterable[object]) -> LabelMapping:
        """Build a mapping from raw label values in the documented stable order.

        Values are normalized first, so ``1`` and ``"1"`` count as one label.
        """
        return cls(tuple(_sorted_labels(normalize_label(label) for label in labels)))

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.labels)

    @property
    def label2id(self) -> dict[str, int]:
        """Label to class id, in the form transformers model configs use."""
        return {label: index for index, label in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        """Class id to label, in the form transformers model configs use."""
        return dict(enumerate(self.labels))

    def encode(self, label: object) -> int:
        """Return the class id of a raw label value.

        Raises ``UnknownLabelError`` naming the label and the known labels when the
        mapping does not contain it.
        """
        key = normalize_label(label)
        class_id = self._ids.get(key)
        if class_id is None:
            raise UnknownLabelError(
                f"unknown label {key!r}: the label mapping from the training data contains {list(self.labels)}. "
                "Fix the label, or train on data that contains this label."
            )
        return class_id

    def encode_all(self, labels: Iterable[object]) -> list[int]:
        """Return the class ids of raw labels (see ``encode``)."""
        return [self.encode(label) for label in labels]

    def decode(self, class_id: int) -> str:
        """Return the label of a class id; raises ``IndexError`` outside ``0..num_labels-1``."""
        if not 0 <= class_id < len(self.labels):
            raise IndexError(f"class id {class_id} is out of range: the mapping has {len(self.labels)} labels")
        return self.labels[class_id]

    def to_dict(self) -> dict[str, list[str]]:
        """Return the JSON-serializable form ``{"labels": [...]}``."""
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: object) -> LabelMapping:
        """Build a mapping from the output of ``to_dict``; raises ``DataError`` if malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("labels"), list):
            raise DataError(f'a label mapping must be a JSON object {{"labels": [...]}}; got {data!r:.200}')
        return cls(tuple(data["labels"]))

    def save(self, path: str | Path) -> None:
        """Write the mapping to ``path`` as UTF-8 JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LabelMapping:
        """Read a mapping written by ``save``.

        Raises ``DataFileNotFoundError`` for a missing file and ``DataError`` for a file
        that is not a valid label mapping.
        """
        path = Path(path)
        if not path.is_file():
            raise DataFileNotFoundError(f"label mapping file {str(path)!r} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"label mapping file {str(path)!r} is not valid JSON: {error}") from None
        try:
            return cls.from_dict(data)
        except DataError as error:
            raise DataError(f"label mapping file {str(path)!r} is invalid: {error}") from None
