"""Reading labelled text examples from local TSV, CSV and JSON Lines files.

The file format follows the extension unless ``file_format`` is given:

- ``.tsv``: UTF-8, tab-separated, first line is the header, quoting DISABLED
  (``csv.QUOTE_NONE``), so quote characters inside sentences are ordinary text and a
  field can contain neither a tab nor a line break. This is how GLUE TSVs are stored.
- ``.csv``: UTF-8, comma-separated, first line is the header, standard CSV quoting
  (``"a, b"`` is one field and ``""`` inside quotes is a literal quote).
- ``.jsonl`` and ``.json``: one JSON object per line (blank lines are skipped). A file
  whose first non-blank character is ``[`` is read as a single JSON array of objects
  instead. The columns are the union of the objects' keys.

A UTF-8 byte order mark at the start of a file is ignored. ``read_examples`` picks one
text column (or two for sentence pairs) and an optional label column, checks every
row, and keeps a reproducible random subset when ``max_samples`` is set (see
``kasa_peft.data.sampling``). A text value that is missing, null, empty or only
whitespace is an error that names the file, line and column.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from kasa_peft.data.errors import DataError, DataFileNotFoundError, MissingColumnError
from kasa_peft.data.labels import LabelMapping, normalize_label, parse_regression_label
from kasa_peft.data.sampling import sample_indices

logger = logging.getLogger(__name__)

FileFormat = Literal["tsv", "csv", "jsonl"]
ProblemType = Literal["classification", "regression"]

FILE_FORMATS: tuple[str, ...] = ("tsv", "csv", "jsonl")
PROBLEM_TYPES: tuple[str, ...] = ("classification", "regression")
EXTENSION_FORMATS: dict[str, FileFormat] = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass(frozen=True)
class Table:
    """The rows of a data file, each a mapping from column name to value.

    ``line_numbers[i]`` is the 1-based line of row ``i`` in the file (the JSON array
    element number for JSON array files), used in error messages.
    """

    path: Path
    columns: tuple[str, ...]
    rows: list[dict[str, object]]
    line_numbers: list[int]
    position_unit: str = "line"

    def location(self, row_index: int) -> str:
        """Return ``"<path> line N"`` for row ``row_index``, for error messages."""
        return f"{self.path} {self.position_unit} {self.line_numbers[row_index]}"


@dataclass(frozen=True)
class TextExamples:
    """Parallel lists of texts, optional second texts and optional labels.

    ``labels`` contains canonical label strings for classification (see
    ``kasa_peft.data.labels.normalize_label``), floats for regression, or None when the
    file was read without a label column (prediction input). ``all_labels`` contains
    the distinct classification labels of the whole file before sampling, in
    ``LabelMapping`` order, so that a mapping built from a sampled split still covers
    every label of the file.
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[str] | list[float] | None
    problem_type: ProblemType
    source: Path
    line_numbers: list[int]
    position_unit: str = "line"
    all_labels: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_pair(self) -> bool:
        """Whether each example is a sentence pair."""
        return self.text_pairs is not None

    def location(self, index: int) -> str:
        """Return ``"<path> line N"`` for example ``index``, for error messages."""
        return f"{self.source} {self.position_unit} {self.line_numbers[index]}"


def detect_file_format(path: str | Path) -> FileFormat:
    """Return the file format implied by the extension of ``path``.

    Raises ``DataError`` listing the supported extensions for any other extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSION_FORMATS:
        raise DataError(
            f"cannot tell the format of {str(path)!r} from its extension {suffix!r}: supported extensions are "
            f"{', '.join(EXTENSION_FORMATS)}. Rename the file or pass the format explicitly "
            f"({', '.join(FILE_FORMATS)})."
        )
    return EXTENSION_FORMATS[suffix]


def read_table(path: str | Path, file_format: FileFormat | None = None) -> Table:
    """Read every row of a TSV, CSV or JSON Lines file (see the module docstring).

    Raises ``DataFileNotFoundError`` if the file does not exist and ``DataError`` for
    a malformed file: missing header, duplicate column names, a row with the wrong
    number of fields, invalid JSON, or bytes that are not UTF-8. A file with a header
    and no rows returns an empty table.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise DataFileNotFoundError(f"data file {str(path)!r} not found{hint}; check the path")
    if file_format is None:
        file_format = detect_file_format(path)
    if file_format not in FILE_FORMATS:
        raise DataError(f"file format {file_format!r} is not supported; expected one of {', '.join(FILE_FORMATS)}")

    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if file_format == "jsonl":
                return _read_json(path, handle.read())
            return _read_delimited(path, handle, file_format)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not valid UTF-8 ({error}); save the file as UTF-8") from None


def _read_delimited(path: Path, handle: TextIO, file_format: FileFormat) -> Table:
    if file_format == "tsv":
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(handle)

    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header
            header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty: expected a header row with the column names")
        columns = tuple(name.strip() for name in header)
        _check_header(path, columns)

        rows: list[dict[str, object]] = []
        line_numbers: list[int] = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(columns):
                separator = "tabs, with quoting disabled" if file_format == "tsv" else "commas"
                raise DataError(
                    f"{path} line {reader.line_num} has {len(fields)} fields but the header has {len(columns)} "
                    f"columns {list(columns)}; fields are separated by {separator}"
                )
            rows.append(dict(zip(columns, fields)))
            line_numbers.append(reader.line_num)
    except csv.Error as error:
        message = f"{path} line {reader.line_num} could not be parsed as {file_format.upper()}: {error}"
        raise DataError(message) from None
    return Table(path, columns, rows, line_numbers)


def _check_header(path: Path, columns: tuple[str, ...]) -> None:
    if any(not name for name in columns):
        raise DataError(f"{path}: the header {list(columns)} contains an empty column name")
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: the header repeats the column names {duplicates}; column names must be unique")


def _read_json(path: Path, text: str) -> Table:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not a valid JSON array: {error}") from None
        if not isinstance(items, list):
            raise DataError(f"{path} must contain a JSON array of objects or one JSON object per line")
        numbered = list(enumerate(items, start=1))
        unit = "item"
    else:
        numbered = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {line_number} is not valid JSON: {error}") from None
        unit = "line"

    columns: dict[str, None] = {}  # insertion-ordered set
    rows: list[dict[str, object]] = []
    line_numbers: list[int] = []
    for position, item in numbered:
        if not isinstance(item, dict):
            raise DataError(f"{path} {unit} {position} is a JSON {type(item).__name__}; expected an object")
        columns.update(dict.fromkeys(item))
        rows.append(item)
        line_numbers.append(position)
    return Table(path, tuple(columns), rows, line_numbers, unit)


_COLUMN_FLAGS = {
    "text_column": "--text-column",
    "text_pair_column": "a second --text-column",
    "label_column": "--label-column",
}


def check_columns(table: Table, required: dict[str, str]) -> None:
    """Raise ``DataError`` unless ``table`` has every required column.

    ``required`` maps an option name (for example ``"text_column"``) to the column it
    names. The message names the missing column and lists the available ones.
    """
    for option, column in required.items():
        if column not in table.columns:
            raise MissingColumnError(
                f"column {column!r} ({option}) not found in {table.path}; available columns: {list(table.columns)}. "
                f"Set {option} to one of them (on the command line: {_COLUMN_FLAGS.get(option, option)}), "
                "or rename the column in the file.",
                option=option,
                column=column,
                available=tuple(table.columns),
            )


def _text_value(table: Table, row_index: int, column: str) -> str:
    value = table.rows[row_index].get(column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(
            f"{table.location(row_index)}: the text in column {column!r} is missing or empty; "
            "every row needs a text value. Fill it in or remove the row."
        )
    if not isinstance(value, str):
        raise DataError(
            f"{table.location(row_index)}: the text in column {column!r} is a {type(value).__name__}; "
            "expected a string"
        )
    return value


def _label_value(table: Table, row_index: int, column: str, problem_type: ProblemType) -> str | float:
    value = table.rows[row_index].get(column)
    try:
        if problem_type == "regression":
            return parse_regression_label(value)
        return normalize_label(value)
    except DataError as error:
        raise DataError(f"{table.location(row_index)}, column {column!r}: {error}") from None


def read_examples(
    path: str | Path,
    *,
    text_column: str,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    problem_type: ProblemType = "classification",
    max_samples: int | None = None,
    seed: int = 0,
    file_format: FileFormat | None = None,
) -> TextExamples:
    """Read, check and optionally subsample the examples of one data file.

    Every row of the file is checked, including rows that sampling then drops. Set
    ``text_pair_column`` for sentence-pair tasks and ``label_column=None`` to read
    unlabelled prediction input. With ``max_samples`` set, a seeded random subset is
    kept in file order (see ``kasa_peft.data.sampling.sample_indices``).

    Raises ``DataFileNotFoundError`` for a missing file and ``DataError`` for a file
    without rows, a missing column, a missing text, or an invalid label.
    """
    if problem_type not in PROBLEM_TYPES:
        raise DataError(f"problem_type {problem_type!r} is invalid; expected one of {', '.join(PROBLEM_TYPES)}")
    table = read_table(path, file_format)
    if not table.rows:
        raise DataError(f"{table.path} contains no data rows (empty split); add examples to the file")

    required = {"text_column": text_column}
    if text_pair_column is not None:
        required["text_pair_column"] = text_pair_column
    if label_column is not None:
        required["label_column"] = label_column
    check_columns(table, required)

    num_rows = len(table.rows)
    texts = [_text_value(table, index, text_column) for index in range(num_rows)]
    text_pairs = None
    if text_pair_column is not None:
        text_pairs = [_text_value(table, index, text_pair_column) for index in range(num_rows)]
    labels = None
    all_labels = None
    if label_column is not None:
        labels = [_label_value(table, index, label_column, problem_type) for index in range(num_rows)]
        if problem_type == "classification":
            all_labels = LabelMapping.from_labels(labels).labels

    keep = sample_indices(num_rows, max_samples, seed)
    if len(keep) < num_rows:
        logger.info("Sampled %d of %d rows from %s with seed %d", len(keep), num_rows, table.path, seed)
        texts = [texts[index] for index in keep]
        if text_pairs is not None:
            text_pairs = [text_pairs[index] for index in keep]
        if labels is not None:
            labels = [labels[index] for index in keep]

    return TextExamples(
        texts=texts,
        text_pairs=text_pairs,
        labels=labels,
        problem_type=problem_type,
        source=table.path,
        line_numbers=[table.line_numbers[index] for index in keep],
        position_unit=table.position_unit,
        all_labels=all_labels,
    )
