"""Task definitions: which files, columns, label type and metrics a fine-tuning run uses.

A ``TaskSpec`` describes one task. Three kinds exist:

- GLUE presets (``glue_task``): sst2, cola, mrpc, rte, stsb and qnli, read from local
  TSVs ``<data_dir>/{train,validation}.tsv``. ``main_metric`` is the single score
  meant for checkpoint selection and one-number reports:

  ======  ==================================  ====================  ====================
  task    columns                             metrics               main metric
  ======  ==================================  ====================  ====================
  sst2    sentence, label (1 = positive)      accuracy              accuracy
  cola    sentence, label (1 = acceptable)    matthews_correlation  matthews_correlation
  mrpc    sentence1, sentence2, label         accuracy, f1          accuracy
  rte     sentence1, sentence2, label         accuracy              accuracy
  stsb    sentence1, sentence2, label (0-5)   pearson, spearman     pearson
  qnli    sentence1, sentence2, label         accuracy              accuracy
  ======  ==================================  ====================  ====================

  Labels follow the Hugging Face ``glue`` dataset. In mrpc 1 means paraphrase. In rte
  and qnli 0 means entailment and 1 not_entailment, and qnli's sentence1 is the
  question. stsb labels are float similarity scores from 0 to 5. The classification
  presets fix the label mapping to ``("0", "1")``, so class ids equal the file labels
  and evaluation needs no training file. That is how QNLI, whose training split is
  often missing from local copies, can still be evaluated.
- The bundled demo (``demo_task``): customer-support tickets in four classes.
- Custom files (``file_task``): any TSV, CSV or JSON Lines files with chosen columns.

``get_task`` looks a preset up by name. Typical use::

    task = get_task("sst2", data_dir="glue")             # or file_task(...)
    train = task.load_split("train", max_samples=2000, seed=0)
    validation = task.load_split("validation")
    label_mapping = task.build_label_mapping(train)       # None for regression
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from kasa_peft.data.errors import DataError, DataFileNotFoundError, UnknownLabelError
from kasa_peft.data.files import FILE_FORMATS, PROBLEM_TYPES, FileFormat, ProblemType, TextExamples, read_examples
from kasa_peft.data.labels import LabelMapping
from kasa_peft.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS

Split = Literal["train", "validation"]
SPLITS: tuple[str, ...] = ("train", "validation")

RESOURCES_DIR = Path(__file__).resolve().parent.parent / "resources"


@dataclass(frozen=True)
class TaskSpec:
    """Files, columns, label type and metrics of one task.

    ``labels`` fixes the classification label mapping (class id = index); when it is
    None the mapping is built from the training file. ``hub_dataset`` names the Hub
    dataset of a preset whose local files were not given, and only changes the error
    message that ``load_split`` raises in that case.
    """

    name: str
    problem_type: ProblemType
    text_column: str
    label_column: str
    text_pair_column: str | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    train_file: Path | None = None
    validation_file: Path | None = None
    labels: tuple[str, ...] | None = None
    file_format: FileFormat | None = None
    hub_dataset: str | None = None

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise DataError(
                f"task {self.name!r}: problem_type {self.problem_type!r} is invalid; "
                f"expected one of {', '.join(PROBLEM_TYPES)}"
            )
        if self.file_format is not None and self.file_format not in FILE_FORMATS:
            raise DataError(
                f"task {self.name!r}: file_format {self.file_format!r} is invalid; "
                f"expected one of {', '.join(FILE_FORMATS)}"
            )

        object.__setattr__(self, "metrics", tuple(self.metrics))
        allowed = CLASSIFICATION_METRICS if self.problem_type == "classification" else REGRESSION_METRICS
        for metric in self.metrics:
            if metric not in allowed:
                raise DataError(
                    f"task {self.name!r}: metric {metric!r} is not available for {self.problem_type}; "
                    f"choose from {list(allowed)}"
                )
        if not self.metrics:
            raise DataError(f"task {self.name!r}: at least one metric is needed; choose from {list(allowed)}")
        if self.main_metric not in self.metrics:
            raise DataError(
                f"task {self.name!r}: main_metric {self.main_metric!r} must be one of the task's metrics "
                f"{list(self.metrics)}"
            )

        if self.labels is not None:
            if self.problem_type == "regression":
                raise DataError(f"task {self.name!r}: a regression task has no label set; remove labels")
            object.__setattr__(self, "labels", LabelMapping(tuple(self.labels)).labels)
        for name in ("train_file", "validation_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @property
    def is_regression(self) -> bool:
        """Whether labels are floats predicted by a single-output regression head."""
        return self.problem_type == "regression"

    @property
    def is_pair(self) -> bool:
        """Whether each example is a sentence pair."""
        return self.text_pair_column is not None

    def split_file(self, split: Split) -> Path:
        """Return the file of ``split``; raise ``DataError`` if the task has none."""
        if split not in SPLITS:
            raise DataError(f"split {split!r} is invalid; expected one of {', '.join(SPLITS)}")
        path = self.train_file if split == "train" else self.validation_file
        if path is not None:
            return path
        if self.hub_dataset is not None:
            raise DataError(
                f"task {self.name!r} has no local files. Loading {self.hub_dataset!r} from the Hugging Face Hub would "
                "need the `datasets` package and network access, which kasa-peft does not use. Download the TSV "
                f"files and pass data_dir (--data-dir on the command line): a folder with {split}.tsv, "
                f"or a folder with a {self.name}/ subfolder."
            )
        raise DataError(f"task {self.name!r} has no {split} file; set {split}_file (--{split}-file)")

    def load_split(self, split: Split, *, max_samples: int | None = None, seed: int = 0) -> TextExamples:
        """Read and check one split; keep a seeded random subset if ``max_samples`` is set.

        Raises ``DataFileNotFoundError`` or ``DataError`` as ``read_examples`` does, and
        ``UnknownLabelError`` if the task has a fixed label set that a row's label is
        not in.
        """
        path = self.split_file(split)
        if not path.is_file():
            if self.hub_dataset is None:  # files named by the user (--train-file, --validation-file)
                where = f"check the path given as {split}_file (--{split}-file)"
                raise DataFileNotFoundError(f"{split} file {str(path)!r} not found; {where}")
            raise DataFileNotFoundError(
                f"{split} file {str(path)!r} of task {self.name!r} not found; check data_dir (--data-dir): "
                f"it should hold {split}.tsv or a {self.name}/ subfolder with it"
            )
        examples = read_examples(
            path,
            text_column=self.text_column,
            text_pair_column=self.text_pair_column,
            label_column=self.label_column,
            problem_type=self.problem_type,
            max_samples=max_samples,
            seed=seed,
            file_format=self.file_format,
        )
        if self.labels is not None:
            _check_label_set(examples, self.labels)
        return examples

    def build_label_mapping(self, train: TextExamples | None = None) -> LabelMapping | None:
        """Return the classification label mapping, or None for regression.

        Uses the task's fixed ``labels`` when set. Otherwise builds the mapping from
        every label of the training file (``train.all_labels``), so that sampling a
        subset does not lose rare labels.
        """
        if self.is_regression:
            return None
        if self.labels is not None:
            return LabelMapping(self.labels)
        if train is None or train.all_labels is None:
            raise DataError(
                f"task {self.name!r} has no fixed label set; pass the labelled training examples to build the mapping"
            )
        return LabelMapping(train.all_labels)

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serializable dict; paths become strings."""
        data: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            data[field.name] = value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TaskSpec:
        """Build a task from the output of ``to_dict``; raises ``DataError`` for unknown keys."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"unknown task fields {unknown}; known fields: {sorted(known)}")
        values = dict(data)
        for name in ("metrics", "labels"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        try:
            return cls(**values)
        except TypeError as error:
            raise DataError(f"invalid task definition {data!r:.300}: {error}") from None


def _check_label_set(examples: TextExamples, labels: tuple[str, ...]) -> None:
    known = set(labels)
    for index, label in enumerate(examples.labels or ()):
        if label not in known:
            raise UnknownLabelError(
                f"{examples.location(index)}: unknown label {label!r}; this task's labels are {list(labels)}"
            )


_GLUE_PRESETS: dict[str, dict[str, object]] = {
    "sst2": {"text_column": "sentence", "metrics": ("accuracy",)},
    "cola": {"text_column": "sentence", "metrics": ("matthews_correlation",)},
    "mrpc": {"text_column": "sentence1", "text_pair_column": "sentence2", "metrics": ("accuracy", "f1")},
    "rte": {"text_column": "sentence1", "text_pair_column": "sentence2", "metrics": ("accuracy",)},
    "stsb": {
        "text_column": "sentence1",
        "text_pair_column": "sentence2",
        "metrics": ("pearson", "spearman"),
        "problem_type": "regression",
    },
    "qnli": {"text_column": "sentence1", "text_pair_column": "sentence2", "metrics": ("accuracy",)},
}

GLUE_TASK_NAMES: tuple[str, ...] = tuple(_GLUE_PRESETS)
DEMO_TASK_NAME = "demo"
TASK_NAMES: tuple[str, ...] = GLUE_TASK_NAMES + (DEMO_TASK_NAME,)


def _resolve_glue_dir(name: str, data_dir: str | Path) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataFileNotFoundError(
            f"data_dir {str(data_dir)!r} for task {name!r} not found or not a directory; "
            f"pass a folder with train.tsv and validation.tsv, or a folder with a {name}/ subfolder"
        )
    task_dir = data_dir / name
    if task_dir.is_dir():
        return task_dir
    folder_name = data_dir.resolve().name.lower()
    if folder_name in _GLUE_PRESETS and folder_name != name:
        # Several GLUE tasks share their column names, so the files alone would not tell.
        raise DataError(
            f"data_dir {str(data_dir)!r} is the folder of task {folder_name!r}, not {name!r}; "
            f"pass {str(data_dir.resolve().parent / name)!r} or the folder above it"
        )
    return data_dir


def glue_task(name: str, data_dir: str | Path | None = None) -> TaskSpec:
    """Return the preset of a GLUE task (see the module docstring for the table).

    ``data_dir`` is either the task folder (containing ``train.tsv`` and
    ``validation.tsv``) or a folder above it with a ``<name>/`` subfolder. Without
    ``data_dir`` the task has no files, and ``load_split`` raises a ``DataError``
    whose message requests a ``data_dir``. A split file that is absent (QNLI's training set, for example) is
    reported by ``load_split``. Raises ``DataError`` for an unknown name.
    """
    key = name.lower()
    if key not in _GLUE_PRESETS:
        raise DataError(f"unknown GLUE task {name!r}; known GLUE tasks: {', '.join(GLUE_TASK_NAMES)}")
    preset = dict(_GLUE_PRESETS[key])
    problem_type = preset.pop("problem_type", "classification")
    metrics = preset.pop("metrics")

    train_file = validation_file = None
    if data_dir is not None:
        task_dir = _resolve_glue_dir(key, data_dir)
        train_file = task_dir / "train.tsv"
        validation_file = task_dir / "validation.tsv"

    return TaskSpec(
        name=key,
        problem_type=problem_type,
        label_column="label",
        metrics=metrics,
        main_metric=metrics[0],
        train_file=train_file,
        validation_file=validation_file,
        labels=("0", "1") if problem_type == "classification" else None,
        file_format="tsv",
        hub_dataset=f"glue/{key}",
        **preset,
    )


def demo_task() -> TaskSpec:
    """Return the bundled customer-support ticket task.

    Single-sentence classification of the ``text`` column into the ``label`` column
    (account, billing, shipping, technical), 320 training and 120 validation rows with
    balanced classes, metric accuracy. The files are in ``kasa_peft/resources``.
    """
    return TaskSpec(
        name=DEMO_TASK_NAME,
        problem_type="classification",
        text_column="text",
        label_column="label",
        metrics=("accuracy",),
        main_metric="accuracy",
        train_file=RESOURCES_DIR / "demo_tickets_train.tsv",
        validation_file=RESOURCES_DIR / "demo_tickets_validation.tsv",
        labels=("account", "billing", "shipping", "technical"),
        file_format="tsv",
    )


def file_task(
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    problem_type: ProblemType = "classification",
    metrics: tuple[str, ...] | None = None,
    main_metric: str | None = None,
    file_format: FileFormat | None = None,
    name: str = "custom",
) -> TaskSpec:
    """Return a task over local TSV, CSV or JSON Lines files.

    The format follows each file's extension unless ``file_format`` is given. Default
    metrics are ``("accuracy",)`` for classification and ``("pearson", "spearman")``
    for regression. ``main_metric`` defaults to the first metric. The label mapping
    is built from the training file (see ``TaskSpec.build_label_mapping``).
    """
    if metrics is None:
        metrics = ("accuracy",) if problem_type == "classification" else ("pearson", "spearman")
    metrics = tuple(metrics)
    if main_metric is None and metrics:
        main_metric = metrics[0]
    return TaskSpec(
        name=name,
        problem_type=problem_type,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        metrics=metrics,
        main_metric=main_metric or "",
        train_file=Path(train_file) if train_file is not None else None,
        validation_file=Path(validation_file) if validation_file is not None else None,
        file_format=file_format,
    )


def get_task(name: str, data_dir: str | Path | None = None) -> TaskSpec:
    """Return the preset called ``name``: a GLUE task name or ``"demo"``.

    ``data_dir`` applies to GLUE tasks only (see ``glue_task``). Raises ``DataError``
    listing the known presets for any other name, and for ``data_dir`` with the demo,
    whose files are bundled.
    """
    key = name.lower()
    if key == DEMO_TASK_NAME:
        if data_dir is not None:
            raise DataError("the demo task uses its bundled files; remove data_dir (--data-dir)")
        return demo_task()
    if key in _GLUE_PRESETS:
        return glue_task(key, data_dir)
    raise DataError(
        f"unknown task preset {name!r}; known presets: {', '.join(TASK_NAMES)}. "
        "For your own files, give train and validation files instead of a preset."
    )
